"""Shared AWS plumbing of the ``aws_s3`` and ``aws_sqs`` plugins and the ``sqs://`` dead-letter sink.

Three things live here so the plugins stay about their events:

- :class:`AwsConfig`: the connection keys every AWS trigger has (``endpoint_url``,
  ``region``, ``profile`` and the ``*_file`` credentials) and :class:`Connection`,
  which builds boto3 clients from them on a :class:`~bridge.blocking.Worker`
  thread. Credentials come from the ``*_file`` keys when set (read at connect
  time, so a systemd ``LoadCredential`` file or a rotated key is picked up on
  reconnect, and masked in every log line), otherwise from boto3's standard
  chain: environment, ``profile`` / shared config, container and instance roles.
- :func:`explain`: turns botocore's exceptions into one :class:`AwsError` line that
  names the service, the endpoint and the queue or bucket (unreachable endpoint,
  rejected or missing credentials, missing queue or bucket). The core logs it and
  retries ``connect()`` with backoff while other triggers run.
- :class:`SqsConsumer`: the SQS reading both sources share (``aws_sqs``, and
  ``aws_s3`` in notifications mode): long polls of up to 10 messages, one receive
  kept in flight ahead of the reader, deletes batched group-commit style (each
  ``delete`` returns once its own message is deleted), visibility extended while a
  message waits to be accepted, and FIFO message groups handed out one message at
  a time (the next message of a group only after the previous one was deleted;
  :class:`bridge.checkpoint.GroupTurns`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field, model_validator

from bridge.plugin import (
    Closed,
    GroupTurns,
    RelPath,
    TriggerConfig,
    Worker,
    read_secret_file,
    register_secret,
)

#: SQS' limit on messages per receive / per batch call
SQS_BATCH = 10
#: received messages held beyond the reader's pace (FIFO groups waiting their turn included)
MAX_BUFFERED = 10 * SQS_BATCH

_SQS_HOST = re.compile(r"^sqs[.-]([a-z0-9-]+)\.amazonaws\.com", re.IGNORECASE)


class AwsError(Exception):
    """An AWS call failed; the message names the service, endpoint and resource."""


# --- config -----------------------------------------------------------------------------------


class AwsConfig(TriggerConfig):
    """Connection keys shared by the AWS triggers (``aws_s3``, ``aws_sqs``)."""

    endpoint_url: str | None = Field(
        None,
        description="S3/SQS-compatible endpoint (MinIO, Ceph, COS' S3 API, a local server); "
        "default: AWS for the region.",
    )
    region: str | None = Field(
        None, description="AWS region; default: AWS_REGION / the profile, or the queue URL's."
    )
    profile: str | None = Field(None, description="Named profile of the shared AWS config files.")
    access_key_id_file: RelPath | None = Field(
        None, description="File holding the access key id (with secret_access_key_file)."
    )
    secret_access_key_file: RelPath | None = Field(
        None, description="File holding the secret access key (never logged)."
    )
    session_token_file: RelPath | None = Field(
        None, description="File holding a session token for temporary credentials."
    )

    @model_validator(mode="after")
    def _key_pair(self) -> AwsConfig:
        if (self.access_key_id_file is None) != (self.secret_access_key_file is None):
            raise ValueError("access_key_id_file and secret_access_key_file must be given together")
        if self.session_token_file is not None and self.access_key_id_file is None:
            raise ValueError(
                "session_token_file needs access_key_id_file and secret_access_key_file"
            )
        return self


@dataclasses.dataclass(frozen=True, kw_only=True)
class Connection:
    """How to build clients: endpoint, region, profile and credential files."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id_file: Path | None = None
    secret_access_key_file: Path | None = None
    session_token_file: Path | None = None

    @classmethod
    def of(cls, config: AwsConfig, region: str | None = None) -> Connection:
        return cls(
            endpoint_url=config.endpoint_url,
            region=config.region or region,
            profile=config.profile,
            access_key_id_file=config.access_key_id_file,
            secret_access_key_file=config.secret_access_key_file,
            session_token_file=config.session_token_file,
        )

    def client(self, service: str, *, read_timeout_s: float = 60.0, what: str = "") -> Any:
        """A boto3 client (blocking: call it on a Worker). Raises AwsError."""
        import boto3
        import botocore.config
        import botocore.exceptions

        keys: dict[str, str] = {}
        try:
            if self.access_key_id_file and self.secret_access_key_file:
                keys["aws_access_key_id"] = read_secret_file(self.access_key_id_file)
                keys["aws_secret_access_key"] = read_secret_file(self.secret_access_key_file)
                if self.session_token_file:
                    keys["aws_session_token"] = read_secret_file(self.session_token_file)
        except ValueError as e:
            raise AwsError(f"{what}: {e}") from None
        for secret in (keys.get("aws_secret_access_key"), keys.get("aws_session_token")):
            register_secret(secret)
        cfg = botocore.config.Config(
            connect_timeout=5,
            read_timeout=read_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=4,
            user_agent_extra="event-bridge",
        )
        try:
            session = boto3.session.Session(profile_name=self.profile, **keys)
            return session.client(
                service, endpoint_url=self.endpoint_url, region_name=self.region, config=cfg
            )
        except botocore.exceptions.ProfileNotFound:
            raise AwsError(f"{what}: AWS profile {self.profile!r} not found") from None
        except botocore.exceptions.NoRegionError:
            raise AwsError(
                f"{what}: no AWS region: set region in the trigger or AWS_REGION"
            ) from None
        except ValueError as e:  # a malformed endpoint_url
            raise AwsError(f"{what}: {e}") from None


def explain(exc: BaseException, *, service: str, what: str, endpoint: str | None) -> AwsError:
    """One clear line for a botocore failure: which service, endpoint and queue/bucket."""
    import botocore.exceptions as bx

    where = endpoint or "AWS"
    if isinstance(exc, AwsError):
        return exc
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return AwsError(
            f"no AWS credentials for {what}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a "
            "profile, or access_key_id_file + secret_access_key_file"
        )
    if isinstance(
        exc,
        bx.EndpointConnectionError
        | bx.ConnectTimeoutError
        | bx.ReadTimeoutError
        | bx.ConnectionClosedError,
    ):
        return AwsError(f"cannot reach {service} at {where} for {what}: {exc}")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "?"))
        msg = str(err.get("Message", "")) or str(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _AUTH_CODES or status in (401, 403):
            return AwsError(
                f"{service} at {where} rejected the credentials for {what} ({code}: {msg})"
            )
        if code in _MISSING_CODES or status == 404:
            return AwsError(f"{what} does not exist at {service} {where} ({code})")
        return AwsError(f"{service} at {where} failed for {what}: {code}: {msg}")
    if isinstance(exc, bx.BotoCoreError):
        return AwsError(f"{service} at {where} failed for {what}: {exc}")
    return AwsError(f"{service} at {where} failed for {what}: {type(exc).__name__}: {exc}")


_AUTH_CODES = {
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "AccessDenied",
    "AccessDeniedException",
    "ExpiredToken",
    "InvalidToken",
    "InvalidSecurity",
}
_MISSING_CODES = {
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "NoSuchBucket",
    "NotFound",
    "404",
}


def region_of_queue_url(url: str) -> str | None:
    """``https://sqs.eu-west-1.amazonaws.com/123/q`` → ``eu-west-1`` (None for other hosts)."""
    host = url.split("://", 1)[-1]
    m = _SQS_HOST.match(host)
    return m.group(1) if m else None


def chunks(items: Sequence[Any], n: int = SQS_BATCH) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# --- the SQS consumer -------------------------------------------------------------------------


class SqsClient(Protocol):
    """The five SQS calls the consumer uses (a fake implements just these)."""

    def get_queue_url(self, **kw: Any) -> Mapping[str, Any]: ...
    def get_queue_attributes(self, **kw: Any) -> Mapping[str, Any]: ...
    def receive_message(self, **kw: Any) -> Mapping[str, Any]: ...
    def delete_message_batch(self, **kw: Any) -> Mapping[str, Any]: ...
    def change_message_visibility_batch(self, **kw: Any) -> Mapping[str, Any]: ...


@dataclasses.dataclass(eq=False, kw_only=True)
class SqsMessage:
    """One received message and its bookkeeping."""

    id: str
    receipt: str
    body: str
    attributes: Mapping[str, str]
    message_attributes: Mapping[str, Any]
    md5: str = ""
    group: str | None = None
    visible_until: float = 0.0  # monotonic
    handed_out: bool = False
    settled: bool = False
    delete_error: str | None = None

    @classmethod
    def of(cls, raw: Mapping[str, Any], visible_until: float) -> SqsMessage:
        attrs = dict(raw.get("Attributes") or {})
        return cls(
            id=str(raw.get("MessageId", "")),
            receipt=str(raw["ReceiptHandle"]),
            body=str(raw.get("Body", "")),
            attributes=attrs,
            message_attributes=dict(raw.get("MessageAttributes") or {}),
            md5=str(raw.get("MD5OfBody", "")),
            group=attrs.get("MessageGroupId"),
            visible_until=visible_until,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueueInfo:
    url: str
    arn: str
    name: str
    account: str
    region: str
    fifo: bool


class SqsConsumer:
    """Reads one SQS queue for one trigger (see the module docstring).

    ``next()`` returns the next message to hand out; every message it returned must
    end in ``delete()`` (accepted) or ``release()`` (visibility 0: redelivered).
    Messages received but never handed out are released by ``aclose()``.
    """

    def __init__(
        self,
        conn: Connection,
        queue: str,
        *,
        name: str,
        logger: logging.Logger,
        wait_time_s: float = 20.0,
        visibility_timeout_s: float = 30.0,
        batch_size: int = SQS_BATCH,
        client: SqsClient | None = None,
    ) -> None:
        self.conn = conn
        self.queue = queue
        self.name = name
        self.log = logger
        self.wait_time_s = int(wait_time_s)
        self.visibility_s = max(1, int(visibility_timeout_s))
        self.batch_size = batch_size
        self.client: SqsClient | None = client
        self.info: QueueInfo | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self._recv_worker: Worker | None = None
        self._ctl_worker: Worker | None = None
        self._receiving: asyncio.Task[list[SqsMessage]] | None = None
        self._ready: collections.deque[SqsMessage] = collections.deque()
        self._groups: GroupTurns[SqsMessage] = GroupTurns()  # FIFO: one out per group
        self._out: dict[int, SqsMessage] = {}  # handed out, not settled
        self._changed = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._to_delete: list[SqsMessage] = []
        self._closed = False

    @property
    def what(self) -> str:
        return f'queue "{self.queue}" (trigger {self.name})'

    @property
    def endpoint(self) -> str | None:
        return self.conn.endpoint_url

    def _err(self, exc: BaseException) -> AwsError:
        return explain(exc, service="SQS", what=self.what, endpoint=self.endpoint)

    @property
    def handed_out(self) -> int:
        """Messages handed out by ``next()`` and not yet deleted or released."""
        return len(self._out)

    @property
    def buffered(self) -> int:
        return len(self._ready) + len(self._groups)

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> QueueInfo:
        """Build the client, resolve the queue and check it answers. Raises AwsError."""
        if self._closed:
            raise AwsError(f"{self.what}: closed")
        if self._ctl_worker is None:
            self._ctl_worker = Worker(f"{self.name}-sqs")
            self._recv_worker = Worker(f"{self.name}-receive")
        self.info = await self._ctl_worker.run(self._open)
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(
                self._extend_loop(), name=f"sqs-visibility:{self.name}"
            )
        return self.info

    def _open(self) -> QueueInfo:
        try:
            if self.client is None:
                self.client = self.conn.client(
                    "sqs", read_timeout_s=self.wait_time_s + 15, what=self.what
                )
            url = self.queue
            if "://" not in url:
                url = str(self.client.get_queue_url(QueueName=url)["QueueUrl"])
            attrs = self.client.get_queue_attributes(
                QueueUrl=url, AttributeNames=["QueueArn", "FifoQueue"]
            )["Attributes"]
        except Exception as e:
            raise self._err(e) from None
        arn = str(attrs.get("QueueArn", ""))
        parts = arn.split(":")
        return QueueInfo(
            url=url,
            arn=arn,
            name=parts[5] if len(parts) > 5 else url.rstrip("/").rsplit("/", 1)[-1],
            account=parts[4] if len(parts) > 5 else "",
            region=parts[3] if len(parts) > 5 else (self.conn.region or ""),
            fifo=str(attrs.get("FifoQueue", "")).lower() == "true" or url.endswith(".fifo"),
        )

    async def aclose(self) -> None:
        """Stop receiving, hand back (visibility 0) every message not yet settled — buffered
        or handed out — so SQS redelivers it at once, and stop the threads. Idempotent. (The
        daemon lets in-flight deliveries settle before it closes a source; an ack that still
        comes later raises, and the message is redelivered: a duplicate, not a loss.)"""
        if self._closed:
            return
        self._closed = True
        self._changed.set()
        try:
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._heartbeat
            if self._receiving is not None:
                # the thread finishes its long poll (at most wait_time); what it got goes back
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    self._take(await asyncio.shield(self._receiving))
                self._receiving = None
            leftovers = [*self._ready, *self._groups.clear(), *self._out.values()]
            self._ready.clear()
            for m in leftovers:
                m.settled = True
            self._out.clear()
            if leftovers:
                await self._change_visibility(leftovers, 0)
                self.stats["released"] += len(leftovers)
        finally:
            for w in (self._recv_worker, self._ctl_worker):
                if w is not None:
                    await w.aclose()

    # --- reading -----------------------------------------------------------------------------

    async def next(self) -> SqsMessage:
        """The next message to hand out. Raises Closed after aclose(), AwsError when SQS fails."""
        while True:
            if self._closed:
                raise Closed("consumer closed")
            self._prefetch()
            if self._ready:
                m = self._ready.popleft()
                m.handed_out = True
                self._out[id(m)] = m
                self._prefetch()
                return m
            waits: set[asyncio.Future[Any]] = set()
            changed = asyncio.ensure_future(self._changed.wait())
            waits.add(changed)
            if self._receiving is not None:
                waits.add(self._receiving)
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            self._changed.clear()
            if self._receiving is not None and self._receiving.done():
                task, self._receiving = self._receiving, None
                self._take(task.result())  # raises the receive's AwsError

    def _prefetch(self) -> None:
        """Keep one receive in flight while fewer than a batch is ready and there is room."""
        if self._receiving is not None or self._closed or self._recv_worker is None:
            return
        if len(self._ready) >= self.batch_size or self.buffered >= MAX_BUFFERED:
            return
        self._receiving = asyncio.create_task(self._receive(), name=f"sqs-receive:{self.name}")

    async def _receive(self) -> list[SqsMessage]:
        assert self._recv_worker is not None
        return await self._recv_worker.run(self._receive_blocking)

    def _receive_blocking(self) -> list[SqsMessage]:
        assert self.client is not None and self.info is not None
        try:
            resp = self.client.receive_message(
                QueueUrl=self.info.url,
                MaxNumberOfMessages=self.batch_size,
                WaitTimeSeconds=self.wait_time_s,
                VisibilityTimeout=self.visibility_s,
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
        except Exception as e:
            raise self._err(e) from None
        until = time.monotonic() + self.visibility_s
        return [SqsMessage.of(raw, until) for raw in resp.get("Messages") or ()]

    def _take(self, messages: list[SqsMessage]) -> None:
        self.stats["received"] += len(messages)
        for m in messages:
            group = m.group if self.info is not None and self.info.fifo else None
            if group is not None and not self._groups.offer(group, m):
                continue  # held until the group's message out is settled
            self._ready.append(m)

    # --- settling ----------------------------------------------------------------------------

    async def delete(self, m: SqsMessage) -> None:
        """Delete ``m`` upstream (it was accepted); returns once SQS confirmed. Raises AwsError
        when the delete failed, after handing ``m`` back as :meth:`release` does."""
        if m.settled:
            return
        if self._ctl_worker is None:
            raise AwsError(f"{self.what}: not connected")
        with self._lock:
            self._to_delete.append(m)
        try:
            await self._ctl_worker.run(self._flush_deletes)
        except Closed:
            raise AwsError(f"{self.what}: closed before message {m.id} was deleted") from None
        if m.delete_error is not None:
            # Hand it back now (visibility 0, with its FIFO group's held messages), as a nack
            # would: kept in _out it would stay invisible for good (its visibility extended)
            # and block its group until a restart. Redelivered, it is a duplicate, not a loss.
            err, m.delete_error = m.delete_error, None
            await self.release(m)
            raise AwsError(f"{self.what}: deleting message {m.id} failed: {err}")
        self._settle(m, deleted=True)

    def _flush_deletes(self) -> None:
        """On the control thread: delete everything queued so far, 10 per call. A delete
        queued while an earlier flush ran is taken by the next one (group commit)."""
        with self._lock:
            batch, self._to_delete = self._to_delete, []
        assert self.client is not None and self.info is not None
        for part in chunks(batch):
            try:
                resp = self.client.delete_message_batch(
                    QueueUrl=self.info.url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(part)
                    ],
                )
            except Exception as e:
                for m in part:
                    m.delete_error = str(self._err(e))
                continue
            for f in resp.get("Failed") or ():
                part[int(f["Id"])].delete_error = f"{f.get('Code')}: {f.get('Message', '')}"

    async def release(self, m: SqsMessage) -> None:
        """Hand ``m`` back (visibility 0) for redelivery; in a FIFO queue the group's held
        messages go back too, so the group's order survives. Never raises."""
        if m.settled:
            return
        back = [m, *self._groups.drop(m.group)] if m.group is not None else [m]
        for x in back:
            self._settle(x, deleted=False)
        await self._change_visibility(back, 0)
        self.stats["released"] += len(back)

    def _settle(self, m: SqsMessage, *, deleted: bool) -> None:
        m.settled = True
        self._out.pop(id(m), None)
        if deleted:
            self.stats["deleted"] += 1
            if m.group is not None:
                nxt = self._groups.done(m.group)
                if nxt is not None:
                    self._ready.append(nxt)
        self._changed.set()

    async def _change_visibility(self, messages: Sequence[SqsMessage], seconds: int) -> None:
        if self._ctl_worker is None or not messages:
            return
        try:
            failed = await self._ctl_worker.run(self._change_blocking, list(messages), seconds)
        except Exception as e:
            failed = [str(self._err(e))]
        if failed:
            self.log.warning(
                "%s: changing the visibility of %d message(s) failed (%s); they come back "
                "when their visibility timeout ends",
                self.what,
                len(failed),
                failed[0],
                extra={"trigger": self.name},
            )

    def _change_blocking(self, messages: list[SqsMessage], seconds: int) -> list[str]:
        assert self.client is not None and self.info is not None
        failed: list[str] = []
        for part in chunks(messages):
            try:
                resp = self.client.change_message_visibility_batch(
                    QueueUrl=self.info.url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m.receipt, "VisibilityTimeout": seconds}
                        for i, m in enumerate(part)
                    ],
                )
            except Exception as e:
                failed.extend(str(self._err(e)) for _ in part)
                continue
            bad = {int(f["Id"]): f for f in resp.get("Failed") or ()}
            until = time.monotonic() + seconds
            for i, m in enumerate(part):
                if i in bad:
                    failed.append(f"{bad[i].get('Code')}: {bad[i].get('Message', '')}")
                else:
                    m.visible_until = until
        return failed

    async def _extend_loop(self) -> None:
        """While messages wait (buffered, or handed out and not yet accepted), push their
        visibility timeout forward so SQS does not hand them to another consumer."""
        period = max(0.5, self.visibility_s / 3)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            due = [
                m
                for m in (
                    *self._ready,
                    *self._out.values(),
                    *self._groups.held(),
                )
                if not m.settled and m.visible_until - now < self.visibility_s / 2
            ]
            if due:
                await self._change_visibility(due, self.visibility_s)
                self.stats["extended"] += len(due)
