"""The aws_s3 trigger through the real daemon against a moto server started by the tests:
notifications (S3 → SQS, and S3 → SNS → SQS) for uploads, copies, deletes and multipart
uploads with URL-encoded keys, the s3:TestEvent skipped, a message that is not a
notification dead-lettered; polling across a restart without duplicates, catching what
changed while the daemon was down; a clear error for an unreachable endpoint while a
timer keeps firing; and the source contract suite for both modes."""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.testing import SourceContract
from sources.aws_s3 import S3Source

from .aws_fixtures import REGION, Moto, aws_env_fixture, free_port, moto_fixture  # noqa: F401
from .conftest import Project, cli, wait_for

KEY = "photos/a b+c ü.jpg"  # arrives as photos%2Fa+b%2Bc+%C3%BC.jpg


def config(project: Project, moto: Moto, trigger: str) -> Path:
    project.function("rec")
    return project.config(
        f"""
        [daemon]
        state_dir = "state"
        queue_poll = "100ms"

        [functions.rec]
        code = "functions/rec"
        environment = {{ OUT = "@OUT@" }}

        [triggers.objects]
        type = "aws_s3"
        function = "rec"
        endpoint_url = "{moto.endpoint}"
        region = "{REGION}"
        appid = "1250000000"
        cos_region = "gz"
        {trigger}
        """
    )


def cos_events(project: Project) -> list[tuple[str, str, int]]:
    out = []
    for r in project.records():
        for rec in r["event"]["Records"]:
            key = rec["cos"]["cosObject"]["key"]
            out.append((rec["event"]["eventName"], key, rec["cos"]["cosObject"]["size"]))
    return out


def test_notifications_for_uploads_copies_deletes_and_multipart(
    project: Project, moto: Moto, daemon
) -> None:  # type: ignore[no-untyped-def]
    bucket, q = moto.bucket(), moto.queue()
    moto.notify(bucket, q)  # moto also sends an s3:TestEvent now
    d = daemon(config(project, moto, f'queue_url = "{q}"\nwait_time = "1s"'))
    d.wait_log(r"reading S3 notifications")
    # When objects are uploaded, copied, deleted and uploaded in parts
    moto.s3.put_object(Bucket=bucket, Key=KEY, Body=b"hello")
    moto.s3.copy_object(Bucket=bucket, Key="copy.txt", CopySource={"Bucket": bucket, "Key": KEY})
    moto.s3.delete_object(Bucket=bucket, Key="copy.txt")
    mp = moto.s3.create_multipart_upload(Bucket=bucket, Key="big/parts.bin")
    p1 = moto.s3.upload_part(
        Bucket=bucket,
        Key="big/parts.bin",
        UploadId=mp["UploadId"],
        PartNumber=1,
        Body=b"x" * 5 * 2**20,
    )
    p2 = moto.s3.upload_part(
        Bucket=bucket, Key="big/parts.bin", UploadId=mp["UploadId"], PartNumber=2, Body=b"y" * 10
    )
    moto.s3.complete_multipart_upload(
        Bucket=bucket,
        Key="big/parts.bin",
        UploadId=mp["UploadId"],
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": p1["ETag"]},
                {"PartNumber": 2, "ETag": p2["ETag"]},
            ]
        },
    )
    prefix = f"/1250000000/{bucket}/"
    want = {
        ("cos:ObjectCreated:Put", prefix + KEY, 5),
        ("cos:ObjectCreated:Copy", prefix + "copy.txt", 5),
        ("cos:ObjectRemove:Delete", prefix + "copy.txt", 5),
        ("cos:ObjectCreated:CompleteMultipartUpload", prefix + "big/parts.bin", 5 * 2**20 + 10),
    }
    # (moto also sends an ObjectCreated:Put for the completed multipart object; S3 does not)
    wait_for(lambda: want <= set(cos_events(project)), what="the four kinds of events")
    wait_for(lambda: moto.counts(q) == (0, 0), what="every notification deleted")
    assert d.stop() == 0
    first = next(
        r
        for r in project.records()
        if r["event"]["Records"][0]["event"]["eventName"] == "cos:ObjectCreated:Put"
    )
    rec = first["event"]["Records"][0]
    assert rec["cos"]["cosBucket"] == {"region": "gz", "name": bucket, "appid": "1250000000"}
    assert rec["event"]["eventSource"] == "qcs::cos" and isinstance(rec["event"]["eventTime"], int)
    assert all("TestEvent" not in json.dumps(r["event"]) for r in project.records())


def test_notifications_through_sns_and_a_message_that_is_not_one(
    project: Project, moto: Moto, daemon
) -> None:  # type: ignore[no-untyped-def]
    bucket, q = moto.bucket(), moto.queue()
    moto.notify_via_sns(bucket, q)
    moto.sqs.send_message(QueueUrl=q, MessageBody="this is not an S3 notification")
    cfg = config(project, moto, f'queue_url = "{q}"\nwait_time = "1s"\nsuffix = ".txt"')
    d = daemon(cfg)
    moto.s3.put_object(Bucket=bucket, Key="skipped.bin", Body=b"1")  # suffix filter
    moto.s3.put_object(Bucket=bucket, Key="dir/hello world.txt", Body=b"12345678")
    wait_for(lambda: cos_events(project), what="the .txt event")
    wait_for(lambda: moto.counts(q) == (0, 0), what="every message deleted")
    r = cli("dlq", "list", "--json", "-c", str(cfg))
    dls = [json.loads(line) for line in r.stdout.splitlines()]
    assert d.stop() == 0
    assert cos_events(project) == [
        ("cos:ObjectCreated:Put", f"/1250000000/{bucket}/dir/hello world.txt", 8)
    ]
    [dl] = dls
    assert dl["ErrorClass"] == "invalid_request" and dl["Body"]["RequestSource"] == "TRIGGER_COS"
    assert "is not an S3 event notification: not JSON" in dl["ErrorMessage"]
    assert json.loads(dl["Body"]["ClientContext"])["body"] == "this is not an S3 notification"


def test_polling_survives_a_restart_and_catches_what_changed_while_down(
    project: Project, moto: Moto, daemon
) -> None:  # type: ignore[no-untyped-def]
    bucket = moto.bucket()
    moto.s3.put_object(Bucket=bucket, Key="before.txt", Body=b"old")  # the baseline
    cfg = config(project, moto, f'mode = "polling"\nbucket = "{bucket}"\ninterval = "300ms"')
    d = daemon(cfg)
    d.wait_log(r"first listing of .*: 1 object\(s\) recorded as the baseline")
    moto.s3.put_object(Bucket=bucket, Key="a.txt", Body=b"hello")
    moto.s3.put_object(Bucket=bucket, Key=KEY, Body=b"12")
    wait_for(lambda: len(cos_events(project)) == 2, what="2 created events")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0
    # While the daemon is down: one created, one changed, one deleted
    moto.s3.put_object(Bucket=bucket, Key="while-down.txt", Body=b"new!")
    moto.s3.put_object(Bucket=bucket, Key="a.txt", Body=b"hello, changed")
    moto.s3.delete_object(Bucket=bucket, Key="before.txt")
    d2 = daemon(cfg)
    wait_for(lambda: len(cos_events(project)) == 5, what="3 more events")
    # A sentinel object: anything delivered twice would have come before its event
    moto.s3.put_object(Bucket=bucket, Key="sentinel-1", Body=b"s")
    wait_for(lambda: len(cos_events(project)) == 6, what="the first sentinel")
    assert d2.stop() == 0
    d3 = daemon(cfg)
    moto.s3.put_object(Bucket=bucket, Key="sentinel-2", Body=b"s")
    wait_for(lambda: len(cos_events(project)) == 7, what="the second sentinel")
    assert d3.stop() == 0
    p = f"/1250000000/{bucket}/"
    assert sorted(cos_events(project)) == sorted(
        [
            ("cos:ObjectCreated:Put", p + "a.txt", 5),
            ("cos:ObjectCreated:Put", p + KEY, 2),
            ("cos:ObjectCreated:Put", p + "while-down.txt", 4),
            ("cos:ObjectCreated:Put", p + "a.txt", 14),
            ("cos:ObjectRemove:Delete", p + "before.txt", 3),
            ("cos:ObjectCreated:Put", p + "sentinel-1", 1),
            ("cos:ObjectCreated:Put", p + "sentinel-2", 1),
        ]
    )


def test_unreachable_endpoint_is_a_clear_error_while_a_timer_keeps_firing(
    project: Project, moto: Moto, daemon
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = config(project, moto, 'mode = "polling"\nbucket = "photos"\ninterval = "1s"')
    text = cfg.read_text().replace(moto.endpoint, f"http://127.0.0.1:{port}")
    text += """
        [triggers.tick]
        type = "timer"
        function = "rec"
        cron = "* * * * * * *"
        message = "tick"
        """
    cfg.write_text(text)
    d = daemon(cfg)
    d.wait_log(
        rf'trigger objects cannot connect: cannot reach S3 at http://127.0.0.1:{port} for bucket "photos"',
        timeout=30,
    )
    wait_for(lambda: len(project.records()) >= 2, what="2 timer events")
    assert d.stop() == 0


def test_missing_bucket_is_a_clear_error(project: Project, moto: Moto, daemon) -> None:  # type: ignore[no-untyped-def]
    d = daemon(config(project, moto, 'mode = "polling"\nbucket = "no-such-bucket"'))
    d.wait_log(
        r'trigger objects cannot connect: bucket "no-such-bucket" \(trigger objects\) does not exist'
    )
    assert d.stop() == 0


class _S3Contract(SourceContract):
    source_class = S3Source
    entry_point = "aws_s3"
    redelivery_timeout_s = 15.0

    @pytest.fixture(autouse=True)
    def _server(self, moto: Moto) -> None:
        self.moto = moto

    async def publish(self, payloads: Sequence[str]) -> None:
        for p in payloads:
            self.moto.s3.put_object(Bucket=self.bucket, Key=p, Body=p.encode())

    def payloads_of(self, event: Any) -> list[str]:
        return [r["key"] for r in event.records]


class TestS3NotificationsContract(_S3Contract):
    async def setup_upstream(self) -> None:
        self.bucket, self.queue = self.moto.bucket(), self.moto.queue()
        self.moto.notify(self.bucket, self.queue, ["s3:ObjectCreated:*"])
        # the s3:TestEvent is deleted by the source without an event

    def config_data(self) -> dict[str, Any]:
        return {
            **super().config_data(),
            "queue_url": self.queue,
            "endpoint_url": self.moto.endpoint,
            "region": REGION,
            "wait_time": "1s",
            "visibility_timeout": "3s",
        }


class TestS3PollingContract(_S3Contract):
    async def setup_upstream(self) -> None:
        self.bucket = self.moto.bucket()

    def config_data(self) -> dict[str, Any]:
        return {
            **super().config_data(),
            "mode": "polling",
            "bucket": self.bucket,
            "interval": "200ms",
            "endpoint_url": self.moto.endpoint,
            "region": REGION,
        }
