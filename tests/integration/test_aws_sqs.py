"""The aws_sqs trigger and the sqs:// dead-letter sink through the real daemon, against a
moto server started by the tests: CMQ events, delete only after acceptance, redelivery
after kill -9, visibility extended while accepting waits, FIFO group order, poison
messages dead-lettered, clear connect errors while other triggers keep running — and the
source contract suite (bridge.testing.SourceContract) against a real queue."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.testing import SourceContract
from sources.aws_sqs import SqsSource

from .aws_fixtures import REGION, Moto, aws_env_fixture, free_port, moto_fixture  # noqa: F401
from .conftest import Project, cli, wait_for


def config(
    project: Project,
    moto: Moto,
    queue: str,
    *,
    extra: str = "",
    fn_env: str = "",
    timeout: str = "3s",
    visibility: str = "5s",
) -> Path:
    project.function("rec")
    return project.config(
        f"""
        [daemon]
        state_dir = "state"
        queue_poll = "100ms"
        {extra}

        [functions.rec]
        code = "functions/rec"
        concurrency = 1
        timeout = "{timeout}"
        environment = {{ OUT = "@OUT@" {fn_env} }}
        [functions.rec.async]
        retry_attempts = 0

        [triggers.jobs]
        type = "aws_sqs"
        function = "rec"
        queue_url = "{queue}"
        endpoint_url = "{moto.endpoint}"
        region = "{REGION}"
        wait_time = "1s"
        visibility_timeout = "{visibility}"
        """
    )


def dead_letters(cfg: Path) -> list[dict[str, Any]]:
    r = cli("dlq", "list", "--json", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def cmq(rec: dict[str, Any]) -> dict[str, Any]:
    return rec["event"]["Records"][0]["CMQ"]  # type: ignore[no-any-return]


def test_messages_become_cmq_events_and_are_deleted(project: Project, moto: Moto, daemon) -> None:  # type: ignore[no-untyped-def]
    q = moto.queue()
    moto.sqs.send_message(
        QueueUrl=q,
        MessageBody='{"order": 1}',
        MessageAttributes={"kind": {"DataType": "String", "StringValue": "order"}},
    )
    moto.sqs.send_message(QueueUrl=q, MessageBody="plain text, not JSON")
    d = daemon(config(project, moto, q))
    wait_for(lambda: len(project.records()) == 2, what="2 events")
    wait_for(lambda: moto.counts(q) == (0, 0), what="both messages deleted")
    got = {cmq(r)["msgBody"]: cmq(r) for r in project.records()}
    assert set(got) == {'{"order": 1}', "plain text, not JSON"}
    first = got['{"order": 1}']
    assert first["msgTag"] == ["kind=order"] and first["type"] == "queue"
    assert first["topicName"] == q.rsplit("/", 1)[1] and first["topicOwner"] == "123456789012"
    assert first["msgId"] and first["publishTime"].endswith("Z")
    assert d.stop() == 0


def test_crash_before_acceptance_redelivers_and_visibility_is_extended(
    project: Project, moto: Moto, daemon
) -> None:  # type: ignore[no-untyped-def]
    q = moto.queue()
    for i in range(5):
        moto.sqs.send_message(QueueUrl=q, MessageBody=f"job-{i}")
    # Given a daemon that can queue only one event (its function sleeps): four messages are
    # received and wait to be accepted
    slow = config(
        project,
        moto,
        q,
        extra="max_queued = 1",
        fn_env=', DELAY = "60"',
        timeout="90s",
        visibility="2s",
    )
    d = daemon(slow)
    d.wait_log(r"START RequestId")
    wait_for(lambda: moto.counts(q) == (0, 4), what="4 received, 1 deleted (accepted)")
    # When they wait longer than the 2 s visibility timeout, it is extended: none reappears
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert moto.counts(q) == (0, 4), "a waiting message became visible again"
        time.sleep(0.25)
    # When the daemon is killed -9 before accepting them
    d.kill()
    # Then SQS still has them (nothing was deleted before acceptance), visible again soon
    wait_for(lambda: moto.counts(q) == (4, 0), timeout=15, what="4 messages visible again")
    assert project.records() == []
    # And a new daemon delivers all five: four redelivered, one from the durable queue
    d2 = daemon(config(project, moto, q))
    wait_for(lambda: len(project.records()) == 5, timeout=30, what="5 events")
    assert sorted(cmq(r)["msgBody"] for r in project.records()) == [f"job-{i}" for i in range(5)]
    wait_for(lambda: moto.counts(q) == (0, 0), what="queue empty")
    assert d2.stop() == 0


def test_fifo_queue_keeps_group_order(project: Project, moto: Moto, daemon) -> None:  # type: ignore[no-untyped-def]
    q = moto.queue(f"fifo-{free_port()}.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    for i in range(6):
        for g in ("A", "B"):
            moto.sqs.send_message(QueueUrl=q, MessageBody=f"{g}{i}", MessageGroupId=g)
    d = daemon(config(project, moto, q))
    try:
        wait_for(lambda: len(project.records()) >= 12, timeout=60, what="12 events")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{d.log()}") from None
    order = [cmq(r)["msgBody"] for r in sorted(project.records(), key=lambda r: r["start"])]
    for g in ("A", "B"):
        assert [b for b in order if b.startswith(g)] == [f"{g}{i}" for i in range(6)]
    assert d.stop() == 0


def test_poison_messages_are_dead_lettered_not_looped(project: Project, moto: Moto, daemon) -> None:  # type: ignore[no-untyped-def]
    q = moto.queue()
    moto.sqs.send_message(QueueUrl=q, MessageBody="x" * (200 * 1024))  # > 128 KB async limit
    moto.sqs.send_message(QueueUrl=q, MessageBody="after the poison")
    cfg = config(project, moto, q)
    d = daemon(cfg)
    dls = wait_for(lambda: dead_letters(cfg), what="a dead letter")
    wait_for(lambda: len(project.records()) == 1, what="the good message")
    wait_for(lambda: moto.counts(q) == (0, 0), what="both messages deleted")
    assert d.stop() == 0
    [dl] = dls
    assert dl["ErrorClass"] == "invalid_request" and dl["Body"]["RequestSource"] == "TRIGGER_CMQ"
    assert "event is" in dl["ErrorMessage"] and "at most 131072" in dl["ErrorMessage"]
    assert dl["Body"]["TriggerName"] == "jobs"
    assert cmq(project.records()[0])["msgBody"] == "after the poison"
    assert len(dead_letters(cfg)) == 1  # dead-lettered once, not looped


def test_unreachable_endpoint_is_a_clear_error_while_a_timer_keeps_firing(
    project: Project, moto: Moto, daemon
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()  # nothing listens here
    cfg = config(project, moto, "jobs")
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
        rf'trigger jobs cannot connect: cannot reach SQS at http://127.0.0.1:{port} for queue "jobs"',
        timeout=30,
    )
    wait_for(lambda: len(project.records()) >= 2, what="2 timer events")
    assert all(r["event"]["Message"] == "tick" for r in project.records())
    assert d.stop() == 0


def test_bad_credentials_are_a_clear_error(
    project: Project, moto: Moto, daemon, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # A second server that checks credentials (moto's IAM enforcement from the first call)
    strict = Moto(tmp_path / "strict.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        (tmp_path / "id").write_text("AKIAWRONGWRONGWRONG1\n")
        (tmp_path / "secret").write_text("not-the-secret-at-all\n")
        cfg = config(project, moto, "jobs")
        text = cfg.read_text().replace(moto.endpoint, strict.endpoint)
        text = text.replace(
            'wait_time = "1s"',
            f'wait_time = "1s"\naccess_key_id_file = "{tmp_path / "id"}"\n'
            f'secret_access_key_file = "{tmp_path / "secret"}"',
        )
        cfg.write_text(text)
        d = daemon(cfg)
        d.wait_log(
            r"trigger jobs cannot connect: SQS at http://127.0.0.1:\d+ rejected the credentials"
        )
        assert "not-the-secret-at-all" not in d.log()
        assert d.stop() == 0
    finally:
        strict.stop()


def test_sqs_dead_letter_sink(project: Project, moto: Moto, daemon) -> None:  # type: ignore[no-untyped-def]
    dlq = moto.queue()
    name = dlq.rsplit("/", 1)[1]
    project.function("rec")
    cfg = project.config(
        f"""
        [daemon]
        state_dir = "state"
        queue_poll = "100ms"

        [functions.rec]
        code = "functions/rec"
        environment = {{ OUT = "@OUT@" }}
        [functions.rec.async]
        retry_attempts = 0
        dead_letter = "sqs://{name}?region={REGION}&endpoint_url={moto.endpoint}"

        [triggers.tick]
        type = "timer"
        function = "rec"
        cron = "* * * * * * *"
        message = "fail"
        """
    )
    d = daemon(cfg)
    got: list[Any] = []

    def received() -> bool:
        r = moto.sqs.receive_message(
            QueueUrl=dlq, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=1
        )
        got.extend(r.get("Messages", []))
        return bool(got)

    wait_for(received, timeout=30, what="a dead letter on the SQS queue")
    assert d.stop() == 0
    rec = json.loads(got[0]["Body"])
    assert rec["ErrorClass"] == "function_error" and rec["Body"]["FunctionName"] == "rec"
    assert json.loads(rec["Body"]["ClientContext"])["Message"] == "fail"
    attrs = got[0]["MessageAttributes"]
    assert attrs["FunctionName"]["StringValue"] == "rec"
    assert attrs["ErrorClass"]["StringValue"] == "function_error"
    assert dead_letters(cfg) == []  # went to SQS, not to the local store


class TestSqsContract(SourceContract):
    """The contract suite against a real (moto) queue, one fresh queue per check."""

    source_class = SqsSource
    entry_point = "aws_sqs"
    redelivery_timeout_s = 15.0
    close_timeout_s = 5.0

    @pytest.fixture(autouse=True)
    def _server(self, moto: Moto) -> None:
        self.moto = moto

    async def setup_upstream(self) -> None:
        self.queue = self.moto.queue()

    def config_data(self) -> dict[str, Any]:
        return {
            **super().config_data(),
            "queue_url": self.queue,
            "endpoint_url": self.moto.endpoint,
            "region": REGION,
            "wait_time": "1s",
            "visibility_timeout": "3s",
        }

    async def publish(self, payloads: Sequence[str]) -> None:
        for p in payloads:
            self.moto.sqs.send_message(QueueUrl=self.queue, MessageBody=p)


FAIL_ONCE = """
import json, os, time

def main_handler(event, context):
    body = event["Records"][0]["CMQ"]["msgBody"]
    marker = os.environ["OUT"] + ".failed-" + body
    if body == os.environ["FAIL_ONCE"] and not os.path.exists(marker):
        open(marker, "w").close()
        raise ValueError("failing once: " + body)
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"body": body, "t": time.time()}) + "\\n")
    return body
"""


def test_fifo_group_order_survives_a_retry(project: Project, moto: Moto, daemon) -> None:  # type: ignore[no-untyped-def]
    # Given a FIFO queue with two groups, and a function that fails A1 once
    q = moto.queue(f"retry-{free_port()}.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    for i in range(4):
        for g in ("A", "B"):
            moto.sqs.send_message(QueueUrl=q, MessageBody=f"{g}{i}", MessageGroupId=g)
    cfg = config(project, moto, q, fn_env=', FAIL_ONCE = "A1"')
    text = cfg.read_text().replace(
        "retry_attempts = 0", 'retry_attempts = 2\nretry_interval = "1s"'
    )
    cfg.write_text(text)
    project.function("rec", FAIL_ONCE)
    d = daemon(cfg)
    # When every message was handled (A1 on its second attempt)
    try:
        wait_for(lambda: len(project.records()) >= 8, timeout=60, what="8 messages handled")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{d.log()}") from None
    wait_for(lambda: moto.counts(q) == (0, 0), what="the queue empty")
    assert d.stop() == 0
    # Then each group was handled in its order: A2 waited for A1's retry
    order = [r["body"] for r in project.records()]
    for g in ("A", "B"):
        assert [b for b in order if b.startswith(g)] == [f"{g}{i}" for i in range(4)], order
