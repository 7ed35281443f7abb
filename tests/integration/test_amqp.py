"""The amqp trigger and dead-letter sink through the real daemon and the RabbitMQ on this
machine (127.0.0.1:5672, guest/guest): CMQ events, acks only after acceptance,
redelivery after kill -9, poison messages, unreachable brokers, dropped connections.

Each test uses queues of its own and deletes them. Without RabbitMQ these tests fail
(``make services`` starts it); they never skip.
"""

from __future__ import annotations

import asyncio
import base64
import json
import selectors
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bridge.testing import free_port
from tests.contract.conftest import require_service

from .conftest import Project, cli, wait_for

BROKER = "amqp://guest:guest@127.0.0.1:5672/"
T = TypeVar("T")

# Records each CMQ message when it starts; STRICT makes a text body that is not JSON fail;
# a body "hold" waits for the file GATE (so acceptance of the next message is held up).
HANDLER = """
import base64, json, os, time

def main_handler(event, context):
    rec = event["Records"][0]["CMQ"]
    body = rec["msgBody"]
    binary = "msgBodyBase64" in rec["msgTag"]
    if binary:
        body = "hex:" + base64.b64decode(body).hex()
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"cmq": rec, "body": body, "request_id": context.request_id}) + "\\n")
    if os.environ.get("STRICT") and not binary:
        json.loads(body)
    if body == "hold":
        deadline = time.time() + 30
        while not os.path.exists(os.environ["GATE"]) and time.time() < deadline:
            time.sleep(0.02)
    if os.environ.get("FAIL"):
        raise RuntimeError("always fails")
    return "ok"
"""


class Rabbit:
    """Test-side broker access: each call opens its own short connection."""

    def __init__(self) -> None:
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    def name(self, what: str) -> str:
        return f"eb-test-{what}-{uuid.uuid4().hex[:8]}"

    def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        import aio_pika

        async def go() -> T:
            conn = await aio_pika.connect(BROKER, timeout=10)
            try:
                return await fn(await conn.channel())
            finally:
                await conn.close()

        return asyncio.run(go())

    def declare(self, queue: str) -> None:
        self.queues.add(queue)

        async def go(ch: Any) -> None:
            await ch.declare_queue(queue, durable=True)

        self._run(go)

    def publish(
        self,
        body: bytes,
        *,
        queue: str | None = None,
        exchange: str = "",
        key: str = "",
        **props: Any,
    ) -> None:
        import aio_pika

        async def go(ch: Any) -> None:
            ex = await ch.get_exchange(exchange) if exchange else ch.default_exchange
            msg = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props)
            await ex.publish(msg, routing_key=queue or key)

        self._run(go)

    def ready(self, queue: str) -> int:
        """Messages ready for delivery (not counting those delivered and not yet acked);
        0 if the queue does not exist (yet)."""
        import aiormq

        async def go(ch: Any) -> int:
            try:
                q = await ch.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return 0
            return int(q.declaration_result.message_count)

        return self._run(go)

    def consumers(self, queue: str) -> int:
        async def go(ch: Any) -> int:
            q = await ch.declare_queue(queue, passive=True)
            return int(q.declaration_result.consumer_count)

        return self._run(go)

    def take(self, queue: str) -> list[Any]:
        """Every message in ``queue`` (acked)."""

        async def go(ch: Any) -> list[Any]:
            q = await ch.declare_queue(queue, passive=True)
            out = []
            while (m := await q.get(fail=False)) is not None:
                await m.ack()
                out.append(m)
            return out

        return self._run(go)

    def cleanup(self) -> None:
        async def go(ch: Any) -> None:
            for q in self.queues:
                try:
                    await ch.queue_delete(q)
                except Exception:
                    pass
            for e in self.exchanges:
                try:
                    await ch.exchange_delete(e)
                except Exception:
                    pass

        self._run(go)


@pytest.fixture
def rabbit() -> Iterator[Rabbit]:
    require_service("127.0.0.1", 5672, "RabbitMQ")
    r = Rabbit()
    yield r
    r.cleanup()


def config(project: Project, body: str, **env: str) -> Path:
    project.function("rec", HANDLER)
    envs = ", ".join(f'{k} = "{v}"' for k, v in {"OUT": "@OUT@", **env}.items())
    return project.config(
        f"""
        [daemon]
        state_dir = "state"
        queue_poll = "100ms"
        shutdown_grace = "5s"

        [functions.rec]
        code = "functions/rec"
        concurrency = 1
        timeout = "60s"
        environment = {{ {envs} }}
        [functions.rec.async]
        retry_attempts = 0
        """
        + body
    )


def bodies(project: Project) -> list[str]:
    return [r["body"] for r in project.records()]


def dead_letters(cfg: Path) -> list[dict[str, Any]]:
    r = cli("dlq", "list", "--json", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_messages_become_cmq_events_and_are_acked(
    project: Project, rabbit: Rabbit, daemon: Any
) -> None:
    queue, exchange = rabbit.name("q"), rabbit.name("ex")
    rabbit.queues.add(queue)
    rabbit.exchanges.add(exchange)
    cfg = config(
        project,
        f"""
        [triggers.orders]
        type = "amqp"
        function = "rec"
        url = "{BROKER}"
        queue = "{queue}"
        exchange = "{exchange}"
        routing_key = ["order.*", "audit.#"]
        prefetch = 10
        """,
    )
    d = daemon(cfg)
    d.wait_log(r"ready: ")
    from datetime import UTC, datetime

    t = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    rabbit.publish(
        b'{"id": 1}',
        exchange=exchange,
        key="order.created",
        message_id="m-1",
        timestamp=t,
        correlation_id="c-1",
        headers={"tags": ["eu", "vip"]},
    )
    rabbit.publish(b"plain text", exchange=exchange, key="audit.x.y", message_id="m-2")
    rabbit.publish(b"not for us", exchange=exchange, key="billing.created")
    rabbit.publish(b"direct", queue=queue, message_id="m-3")
    wait_for(lambda: len(project.records()) == 3, what="3 events")
    assert d.stop() == 0
    recs = {r["cmq"]["msgId"]: r["cmq"] for r in project.records()}
    assert recs["m-1"] == {
        "type": "topic",
        "topicOwner": "",
        "topicName": exchange,
        "subscriptionName": queue,
        "publishTime": "2026-05-01T12:00:00Z",
        "msgId": "m-1",
        "requestId": "c-1",
        "msgBody": '{"id": 1}',
        "msgTag": ["order.created", "eu", "vip"],
    }
    assert recs["m-2"]["msgBody"] == "plain text" and recs["m-2"]["msgTag"] == ["audit.x.y"]
    assert (recs["m-3"]["type"], recs["m-3"]["topicName"]) == ("queue", queue)
    # everything was acked: nothing comes back once the consumer is gone
    assert rabbit.ready(queue) == 0


def test_acked_only_after_acceptance_and_redelivered_after_kill_9(
    project: Project, rabbit: Rabbit, daemon: Any
) -> None:
    queue = rabbit.name("q")
    rabbit.declare(queue)
    gate = project.root / "GATE"
    cfg = config(
        project,
        f"""
        [triggers.jobs]
        type = "amqp"
        function = "rec"
        url = "{BROKER}"
        queue = "{queue}"
        """,
        GATE=str(gate),
    )
    # one event may wait in the local queue: the next one cannot be accepted
    cfg.write_text(
        cfg.read_text().replace('queue_poll = "100ms"', 'queue_poll = "100ms"\nmax_queued = 1')
    )
    d = daemon(cfg)
    d.wait_log(r"ready: ")
    # Given a first message whose invocation is held, so it stays queued locally
    rabbit.publish(b"hold", queue=queue, message_id="first")
    wait_for(lambda: bodies(project) == ["hold"], what="the first invocation")
    # When a second message is delivered to the daemon but cannot be accepted yet
    rabbit.publish(b"second", queue=queue, message_id="second")
    wait_for(lambda: rabbit.ready(queue) == 0, what="the second message to be delivered")
    # Then it is not acked: killed now, the broker gives it back (and only it: the first
    # was acked once it was accepted)
    d.kill()
    wait_for(lambda: rabbit.ready(queue) == 1, what="the unacked message to be requeued")
    # And a new daemon delivers both: the first from the local queue, the second again
    gate.touch()
    d2 = daemon(cfg)
    wait_for(lambda: sorted(bodies(project)) == ["hold", "hold", "second"], what="both, again")
    assert d2.stop() == 0
    assert rabbit.ready(queue) == 0
    assert [r["cmq"]["msgId"] for r in project.records()].count("second") == 1


def test_poison_messages_are_dead_lettered_not_looped(
    project: Project, rabbit: Rabbit, daemon: Any
) -> None:
    queue = rabbit.name("q")
    rabbit.declare(queue)
    cfg = config(
        project,
        f"""
        [triggers.jobs]
        type = "amqp"
        function = "rec"
        url = "{BROKER}"
        queue = "{queue}"
        """,
        STRICT="1",
    )
    huge = b'{"pad": "' + b"x" * 200_000 + b'"}'
    rabbit.publish(huge, queue=queue, message_id="huge")
    rabbit.publish(b"<not json>", queue=queue, message_id="not-json")
    rabbit.publish(b"\xff\xfe\x00bin", queue=queue, message_id="binary")
    rabbit.publish(b'{"ok": true}', queue=queue, message_id="good")
    d = daemon(cfg)
    dls = wait_for(lambda: len(x := dead_letters(cfg)) == 2 and x, what="2 dead letters")
    wait_for(lambda: len(project.records()) == 3, what="3 invocations")
    # the queue is drained: every message was acked once accepted
    wait_for(lambda: rabbit.ready(queue) == 0, what="an empty queue")
    # a sentinel shows the daemon went on; no poison message came back
    rabbit.publish(b'"sentinel"', queue=queue, message_id="sentinel")
    wait_for(lambda: "sentinel" in [r["cmq"]["msgId"] for r in project.records()], what="sentinel")
    assert d.stop() == 0
    assert rabbit.ready(queue) == 0
    ids = [r["cmq"]["msgId"] for r in project.records()]
    assert sorted(ids) == ["binary", "good", "not-json", "sentinel"]  # each once; huge never
    by_class = {r["ErrorClass"]: r for r in dls}
    assert set(by_class) == {"invalid_request", "function_error"}
    too_big = by_class["invalid_request"]
    assert "Event invocations allow at most 131072" in too_big["ErrorMessage"]
    assert too_big["Body"]["RequestSource"] == "TRIGGER_CMQ"
    assert json.loads(too_big["Body"]["ClientContext"])["Records"][0]["CMQ"]["msgId"] == "huge"
    bad = json.loads(by_class["function_error"]["Body"]["ClientContext"])
    assert bad["Records"][0]["CMQ"]["msgBody"] == "<not json>"
    binary = next(r for r in project.records() if r["cmq"]["msgId"] == "binary")
    assert binary["body"] == "hex:" + b"\xff\xfe\x00bin".hex()
    assert binary["cmq"]["msgBody"] == base64.b64encode(b"\xff\xfe\x00bin").decode()


def test_an_unreachable_broker_and_bad_credentials_are_clear_while_a_timer_fires(
    project: Project, rabbit: Rabbit, daemon: Any
) -> None:
    queue = rabbit.name("q")
    closed_port = free_port()
    project.function("tick")  # the conftest recorder: one line per timer tick
    cfg = config(
        project,
        f"""
        [functions.tick]
        code = "functions/tick"
        environment = {{ OUT = "{project.root / "ticks.jsonl"}" }}

        [triggers.down]
        type = "amqp"
        function = "rec"
        url = "amqp://eb-user:eb-s3cret-one@127.0.0.1:{closed_port}/"
        queue = "{queue}"

        [triggers.badpass]
        type = "amqp"
        function = "rec"
        url = "amqp://guest:Wr0ng-pa55word@127.0.0.1:5672/"
        queue = "{queue}"

        [triggers.every-second]
        type = "timer"
        function = "tick"
        cron = "@every 1s"
        """,
    )
    ticks = project.root / "ticks.jsonl"
    d = daemon(cfg)
    d.wait_log(
        rf"trigger down cannot connect: cannot reach AMQP broker "
        rf"amqp://eb-user:\*\*\*@127\.0\.0\.1:{closed_port}/: .*; retrying in 1s"
    )
    d.wait_log(
        r"trigger badpass cannot connect: AMQP broker amqp://guest:\*\*\*@127\.0\.0\.1:5672/ "
        r"refused the credentials of user 'guest'"
    )
    # the timer in the same daemon keeps firing, and both keep being retried with backoff
    wait_for(lambda: ticks.exists() and len(ticks.read_text().splitlines()) >= 3, what="3 ticks")
    d.wait_log(r"trigger down cannot connect: .*retrying in 2s", timeout=10)
    assert d.stop() == 0
    assert "Wr0ng-pa55word" not in d.log() and "eb-s3cret-one" not in d.log()


def test_reconnects_after_the_connection_drops(
    project: Project, rabbit: Rabbit, daemon: Any
) -> None:
    queue = rabbit.name("q")
    rabbit.declare(queue)
    with Proxy(("127.0.0.1", 5672)) as proxy:
        cfg = config(
            project,
            f"""
            [triggers.jobs]
            type = "amqp"
            function = "rec"
            url = "amqp://guest:guest@127.0.0.1:{proxy.port}/"
            queue = "{queue}"
            """,
        )
        d = daemon(cfg)
        d.wait_log(r"ready: ")
        rabbit.publish(b"before", queue=queue)
        wait_for(lambda: bodies(project) == ["before"], what="the first message")
        # When the connection is cut under the consumer
        proxy.cut()
        # (the password "guest" is masked wherever it appears, the user name "guest" too)
        d.wait_log(r"trigger jobs: reconnected to amqp://\S+:\*\*\*@127\.0\.0\.1")
        wait_for(lambda: rabbit.consumers(queue) == 1, what="the consumer to be back")
        # Then messages flow again
        rabbit.publish(b"after", queue=queue)
        wait_for(lambda: bodies(project) == ["before", "after"], what="the second message")
        assert d.stop() == 0
    assert rabbit.ready(queue) == 0


def test_dead_letters_published_to_amqp_with_confirms(
    project: Project, rabbit: Rabbit, daemon: Any
) -> None:
    queue, dlq = rabbit.name("q"), rabbit.name("dlq")
    rabbit.declare(queue)
    rabbit.queues.add(dlq)
    cfg = config(
        project,
        f"""
        [triggers.jobs]
        type = "amqp"
        function = "rec"
        url = "{BROKER}"
        queue = "{queue}"
        """,
        FAIL="1",
    )
    text = cfg.read_text().replace(
        "retry_attempts = 0", f'retry_attempts = 0\ndead_letter = "{BROKER}?queue={dlq}"'
    )
    # and a second function whose sink cannot route anything: its dead letter stays queued
    unroutable = f"{BROKER}?exchange=amq.direct&routing_key=nobody-{uuid.uuid4().hex[:8]}"
    orphan_q = rabbit.name("q2")
    rabbit.declare(orphan_q)
    text += f"""
[functions.other]
code = "functions/rec"
environment = {{ OUT = "{project.root / "other.jsonl"}", FAIL = "1" }}
[functions.other.async]
retry_attempts = 0
dead_letter = "{unroutable}"

[triggers.other]
type = "amqp"
function = "other"
url = "{BROKER}"
queue = "{orphan_q}"
"""
    cfg.write_text(text)
    d = daemon(cfg)
    d.wait_log(r"ready: ")
    rabbit.publish(b'{"n": 1}', queue=queue, message_id="m-dl")
    rabbit.publish(b'{"n": 2}', queue=orphan_q, message_id="m-stuck")
    wait_for(lambda: rabbit.ready(dlq) == 1, what="a dead letter in the AMQP queue")
    d.wait_log(r"was not confirmed by amqp://\S+:\*\*\*@127\.0\.0\.1:5672/: unroutable")
    assert d.stop() == 0
    [msg] = rabbit.take(dlq)
    record = json.loads(msg.body)
    assert msg.content_type == "application/json" and msg.message_id == record["RequestId"]
    assert msg.delivery_mode == 2  # persistent
    assert record["ErrorClass"] == "function_error"
    assert record["Body"]["RequestSource"] == "TRIGGER_CMQ"
    assert record["Body"]["FunctionName"] == "rec" and record["Body"]["TriggerName"] == "jobs"
    ctx = json.loads(record["Body"]["ClientContext"])
    assert ctx["Records"][0]["CMQ"]["msgId"] == "m-dl"
    # the unroutable one was neither lost nor written elsewhere: it waits in the local queue
    assert dead_letters(cfg) == []
    assert rabbit.ready(queue) == 0 and rabbit.ready(orphan_q) == 0


# --- helpers ----------------------------------------------------------------------------------


class Proxy:
    """A TCP forwarder whose connections the test can cut (a broker restart, seen from the
    client). One selector thread; ``cut()`` closes every live connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.peers: dict[socket.socket, socket.socket] = {}
        self.lock = threading.Lock()
        self.cutting = False
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="amqp-proxy", daemon=True)

    def __enter__(self) -> Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping = True
        self.thread.join(5)
        self.listener.close()

    def cut(self) -> None:
        self.cutting = True
        wait_for(lambda: not self.cutting, what="the proxy to cut")

    def _run(self) -> None:
        while not self.stopping:
            if self.cutting:
                for s in list(self.peers):
                    self._drop(s)
                self.cutting = False
            for key, _ in self.sel.select(0.05):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                if s is self.listener:
                    client, _ = self.listener.accept()
                    server = socket.create_connection(self.upstream)
                    for a, b in ((client, server), (server, client)):
                        a.setblocking(False)
                        self.peers[a] = b
                        self.sel.register(a, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._drop(s)
                    continue
                try:
                    self.peers[s].sendall(data)
                except (OSError, KeyError):
                    self._drop(s)
        for s in list(self.peers):
            self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        other = self.peers.pop(s, None)
        for x in (s, other):
            if x is None:
                continue
            self.peers.pop(x, None)
            try:
                self.sel.unregister(x)
            except (KeyError, ValueError):
                pass
            x.close()
