"""S3 and SQS for the tests, started by the tests themselves: moto's server (``moto_server``,
from ``moto[server]``) in a subprocess on a free port, with real S3 → SQS notifications
(keys URL-encoded, plus an ``s3:TestEvent``) and SNS → SQS subscriptions.

A server that cannot be started fails the test (it never skips). Each test gets fresh
buckets and queues named after a counter, so one server serves a whole module. The
environment gets fake credentials and ``AWS_EC2_METADATA_DISABLED`` so that neither the
tests nor the daemons they start ever look for credentials outside this machine.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from bridge.testing import free_port

REGION = "us-east-1"
ACCOUNT = "123456789012"
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


class Moto:
    """A running moto server and boto3 clients for it."""

    def __init__(self, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("w")
        exe = Path(sys.executable).with_name("moto_server")
        if not exe.exists():
            pytest.fail(f"moto_server is not installed next to {sys.executable} (moto[server])")
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV, **(env or {})},
        )
        self.wait_ready()
        kw: dict[str, Any] = {"endpoint_url": self.endpoint, "region_name": REGION}
        self.s3 = boto3.client("s3", **kw)
        self.sqs = boto3.client("sqs", **kw)
        self.sns = boto3.client("sns", **kw)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"moto_server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"moto_server did not answer within {timeout}s:\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    # --- helpers ------------------------------------------------------------------------------

    def queue(self, name: str | None = None, **attributes: str) -> str:
        name = name or unique("q")
        return str(self.sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])

    def queue_arn(self, url: str) -> str:
        attrs = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(attrs["Attributes"]["QueueArn"])

    def bucket(self, name: str | None = None) -> str:
        name = name or unique("bkt")
        self.s3.create_bucket(Bucket=name)
        return name

    def notify(self, bucket: str, queue_url: str, events: list[str] | None = None) -> None:
        """Send the bucket's object events to the queue (moto adds an s3:TestEvent)."""
        self.s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {
                        "QueueArn": self.queue_arn(queue_url),
                        "Events": events or ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                    }
                ]
            },
        )

    def notify_via_sns(self, bucket: str, queue_url: str) -> str:
        topic = self.sns.create_topic(Name=unique("topic"))["TopicArn"]
        self.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=self.queue_arn(queue_url))
        self.s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={
                "TopicConfigurations": [{"TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}]
            },
        )
        return str(topic)

    def counts(self, url: str) -> tuple[int, int]:
        """(visible, in flight) messages of a queue."""
        a = self.sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(
            a["ApproximateNumberOfMessagesNotVisible"]
        )


@pytest.fixture(scope="module", name="aws_env")
def aws_env_fixture() -> Iterator[None]:
    """Fake credentials for this process and the daemons it starts; no metadata lookups."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(k, raising=False)
        yield


@pytest.fixture(scope="module", name="moto")
def moto_fixture(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    server = Moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()
