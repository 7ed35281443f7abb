"""COS events for files: ``cos:ObjectCreated:Put`` for a file fully written, ``cos:ObjectRemove:Delete``
for one gone. The object key is the path relative to its root, the ETag the file's version."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime

from bridge.plugin import Event, Kind, cos_record
from sources.filesystem.config import FilesystemConfig
from sources.filesystem.paths import Root, Sig, etag

CREATED = "cos:ObjectCreated:Put"
REMOVED = "cos:ObjectRemove:Delete"


def file_event(
    config: FilesystemConfig, trigger: str, bucket: str, root: Root, key: str, sig: Sig | None
) -> Event:
    """The event of ``key`` under ``root`` now at version ``sig`` (None: removed)."""
    if sig is None:
        when, name, size, tag = datetime.now(UTC), REMOVED, 0, ""
    else:
        when, name, size, tag = (
            datetime.fromtimestamp(sig[0] / 1e9, UTC),
            CREATED,
            sig[1],
            etag(sig),
        )
    url = root.url + urllib.parse.quote(key)  # what Path.as_uri() gives, 5x cheaper
    rec = cos_record(
        bucket=bucket,
        key=key,
        event_name=name,
        time=when,
        size=size,
        etag=tag,
        region=config.region,
        appid=config.appid,
        url=url,
        # the SCF rendering has no ETag field of its own: it travels in the object meta
        meta={"ETag": tag} if tag else None,
    )
    # no native payload: there is no upstream message (format = "native" renders as scf)
    return Event.fresh(kind=Kind.COS, trigger=trigger, time=when, records=(rec,))


def sample_event(
    config: FilesystemConfig, trigger: str, bucket: str, root: Root, now: datetime
) -> Event:
    """What ``event-bridge fire`` sends: an empty example.txt written now."""
    sig = (int(now.timestamp() * 1e9), 0)
    key = "example.txt"
    rec = cos_record(
        bucket=bucket,
        key=key,
        event_name=CREATED,
        time=now,
        size=0,
        etag=etag(sig),
        region=config.region,
        appid=config.appid,
        url=(root.path / key).as_uri(),
        meta={"ETag": etag(sig)},
    )
    return Event.fresh(kind=Kind.COS, trigger=trigger, time=now, records=(rec,))
