"""Events/s from a pre-loaded SQS queue to a no-op Python function, against two SQS servers.

Runs the real daemon (``event-bridge run``) with one ``aws_sqs`` trigger (long poll
``wait_time = 1s``, batches of 10, ``visibility_timeout = 30s``) and a no-op python
function (``concurrency = 8``), and reports, from the moment the daemon is ready:

- accepted/s: messages durably queued and deleted from SQS (the source's throughput);
- invoked/s: invocations finished (REPORT lines), i.e. end to end.

Neither server is AWS (no network here). By default both run, one after the other,
and the figures are printed side by side (``--server`` picks one):

- ``sqs-stub``: this bench's own SQS server (:func:`serve_stub` in this file): SQS'
  JSON protocol over real HTTP (boto3 talks to it exactly as to AWS), visibility
  timeouts and receipt handles, O(1) bookkeeping per message, in a process of its own.
  It is not SQS: no long-poll fairness, no throttling, no network latency — an upper
  bound of what the bridge does, not of what AWS gives. ``--messages`` (10,000).
- ``moto``: moto's server, what the tests use. Its SQS keeps messages in a list and
  rescans it (and recomputes the queue's attributes) for every send, receive and
  delete, so a receive of 10 takes ~1.5 s at a depth of 1,000 and far longer at
  10,000: the figure measures moto more than the bridge. ``--moto-messages`` (300).

Usage: python bench/sqs_throughput.py [--server both|sqs-stub|moto] [--messages N]
       [--moto-messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from bridge.testing import free_port

EXE = str(Path(sys.executable).with_name("event-bridge"))
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


# --- the stub SQS server ------------------------------------------------------------------------


def serve_stub(port: int) -> None:
    """SQS' JSON protocol for one process: the calls the bridge and this bench make."""
    from aiohttp import web

    queues: dict[str, dict[str, Any]] = {}
    receipts = itertools.count()
    calls: collections.Counter[str] = collections.Counter()

    def queue(url: str) -> dict[str, Any]:
        return queues[url.rstrip("/").rsplit("/", 1)[-1]]

    def expire(q: dict[str, Any]) -> None:
        now = time.monotonic()
        for r, (m, until) in list(q["inflight"].items()):
            if until <= now:
                del q["inflight"][r]
                q["visible"].appendleft(m)

    async def handle(request: web.Request) -> web.Response:
        action = request.headers.get("X-Amz-Target", "").split(".")[-1]
        body = json.loads(await request.read() or b"{}")
        calls[action] += 1
        calls[action + "Entries"] += len(body.get("Entries") or ())
        out: dict[str, Any] = {}
        if action == "CreateQueue":
            name = body["QueueName"]
            queues.setdefault(
                name, {"visible": collections.deque(), "inflight": {}, "event": asyncio.Event()}
            )
            out = {"QueueUrl": f"http://127.0.0.1:{port}/000000000000/{name}"}
        elif action == "GetQueueUrl":
            out = {"QueueUrl": f"http://127.0.0.1:{port}/000000000000/{body['QueueName']}"}
        elif action == "GetQueueAttributes":
            q = queue(body["QueueUrl"])
            expire(q)
            name = body["QueueUrl"].rsplit("/", 1)[-1]
            out = {
                "Attributes": {
                    "QueueArn": f"arn:aws:sqs:us-east-1:000000000000:{name}",
                    "FifoQueue": "false",
                    "ApproximateNumberOfMessages": str(len(q["visible"])),
                    "ApproximateNumberOfMessagesNotVisible": str(len(q["inflight"])),
                    **{f"Bench{k}": str(v) for k, v in calls.items()},
                }
            }
        elif action in ("SendMessageBatch", "SendMessage"):
            q = queue(body["QueueUrl"])
            entries = body.get("Entries") or [{"Id": "0", **body}]
            ok = []
            for e in entries:
                m = {
                    "MessageId": str(uuid.uuid4()),
                    "Body": e["MessageBody"],
                    "MD5OfBody": hashlib.md5(e["MessageBody"].encode()).hexdigest(),
                    "Attributes": {"SentTimestamp": str(int(time.time() * 1000))},
                }
                q["visible"].append(m)
                ok.append(
                    {"Id": e["Id"], "MessageId": m["MessageId"], "MD5OfMessageBody": m["MD5OfBody"]}
                )
            q["event"].set()
            out = {"Successful": ok, "Failed": []} if "Entries" in body else ok[0]
        elif action == "ReceiveMessage":
            q = queue(body["QueueUrl"])
            deadline = time.monotonic() + float(body.get("WaitTimeSeconds", 0))
            while not q["visible"]:
                expire(q)
                if q["visible"] or time.monotonic() >= deadline:
                    break
                q["event"].clear()
                try:
                    await asyncio.wait_for(q["event"].wait(), min(1.0, deadline - time.monotonic()))
                except TimeoutError:
                    pass
            vis = float(body.get("VisibilityTimeout", 30))
            msgs = []
            for _ in range(min(int(body.get("MaxNumberOfMessages", 1)), len(q["visible"]))):
                m = q["visible"].popleft()
                r = f"rh-{next(receipts)}"
                q["inflight"][r] = (m, time.monotonic() + vis)
                msgs.append({**m, "ReceiptHandle": r})
            out = {"Messages": msgs} if msgs else {}
        elif action == "DeleteMessageBatch":
            q = queue(body["QueueUrl"])
            ok, failed = [], []
            for e in body["Entries"]:
                if q["inflight"].pop(e["ReceiptHandle"], None) is not None:
                    ok.append({"Id": e["Id"]})
                else:
                    failed.append(
                        {"Id": e["Id"], "Code": "ReceiptHandleIsInvalid", "SenderFault": True}
                    )
            out = {"Successful": ok, "Failed": failed}
        elif action == "ChangeMessageVisibilityBatch":
            q = queue(body["QueueUrl"])
            ok = []
            for e in body["Entries"]:
                got = q["inflight"].pop(e["ReceiptHandle"], None)
                if got is not None:
                    if int(e["VisibilityTimeout"]) == 0:
                        q["visible"].appendleft(got[0])
                        q["event"].set()
                    else:
                        q["inflight"][e["ReceiptHandle"]] = (
                            got[0],
                            time.monotonic() + int(e["VisibilityTimeout"]),
                        )
                ok.append({"Id": e["Id"]})
            out = {"Successful": ok, "Failed": []}
        else:
            return web.json_response(
                {"__type": "UnsupportedOperation", "message": action}, status=400
            )
        return web.json_response(out, content_type="application/x-amz-json-1.0")

    app = web.Application(client_max_size=2**22)
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- the bench ----------------------------------------------------------------------------------


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"the SQS server did not listen on {port}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", choices=["both", "sqs-stub", "stub", "moto"], default="both")
    ap.add_argument("--messages", type=int, default=10_000, help="messages for sqs-stub")
    ap.add_argument("--moto-messages", type=int, default=300, help="messages for moto")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--serve-stub", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_stub:
        serve_stub(args.serve_stub)
        return
    os.environ.update(ENV)
    runs = []
    if args.server in ("both", "sqs-stub", "stub"):
        runs.append(("sqs-stub", args.messages))
    if args.server in ("both", "moto"):
        runs.append(("moto", args.moto_messages))
    results = [(server, n, *run(server, n, args.concurrency)) for server, n in runs]
    print(f"\nno-op python function, concurrency {args.concurrency}; wait_time 1s, batches of 10")
    print(f"{'server':<10}{'messages':>10}{'accepted/s':>13}{'invoked/s':>12}")
    for server, n, acc, inv in results:
        print(f"{server:<10}{n:>10,}{acc:>13,.0f}{inv:>12,.0f}")


def run(server_kind: str, messages: int, concurrency: int) -> tuple[float, float]:
    """One run against ``server_kind``: (accepted/s, invoked/s)."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    if server_kind == "sqs-stub":
        cmd = [sys.executable, __file__, "--serve-stub", str(port)]
    else:
        cmd = [str(Path(sys.executable).with_name("moto_server")), "-p", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = None
    try:
        wait_port(port)
        sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
        url = sqs.create_queue(QueueName="bench")["QueueUrl"]
        t0 = time.perf_counter()
        for i in range(0, messages, 10):
            n = min(10, messages - i)
            sqs.send_message_batch(
                QueueUrl=url,
                Entries=[{"Id": str(j), "MessageBody": json.dumps({"n": i + j})} for j in range(n)],
            )
        print(f"pre-loaded {messages} messages in {time.perf_counter() - t0:.1f}s ({server_kind})")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "fn").mkdir()
            (root / "fn" / "index.py").write_text(
                "def main_handler(event, context):\n    return None\n"
            )
            (root / "bridge.toml").write_text(
                textwrap.dedent(
                    f"""
                    [daemon]
                    state_dir = "state"
                    log_level = "info"

                    [functions.noop]
                    code = "fn"
                    concurrency = {concurrency}

                    [triggers.queue]
                    type = "aws_sqs"
                    function = "noop"
                    queue_url = "{url}"
                    endpoint_url = "{endpoint}"
                    region = "us-east-1"
                    wait_time = "1s"
                    visibility_timeout = "30s"
                    """
                )
            )
            log = root / "daemon.log"
            with log.open("w") as fh:
                daemon = subprocess.Popen(
                    [EXE, "run", "-c", str(root / "bridge.toml")],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
                while "ready:" not in log.read_text():
                    if daemon.poll() is not None:
                        raise SystemExit(log.read_text())
                    time.sleep(0.01)
                t_ready = time.perf_counter()
                t_accepted = t_invoked = None
                deadline = t_ready + 900
                while time.perf_counter() < deadline:
                    if t_accepted is None:
                        a = sqs.get_queue_attributes(
                            QueueUrl=url,
                            AttributeNames=[
                                "ApproximateNumberOfMessages",
                                "ApproximateNumberOfMessagesNotVisible",
                            ],
                        )["Attributes"]
                        if (
                            int(a["ApproximateNumberOfMessages"])
                            + int(a["ApproximateNumberOfMessagesNotVisible"])
                            == 0
                        ):
                            t_accepted = time.perf_counter()
                    if len(re.findall(r"REPORT RequestId", log.read_text())) >= messages:
                        t_invoked = time.perf_counter()
                        break
                    time.sleep(0.05)
                daemon.terminate()
                daemon.wait(60)
            if server_kind == "sqs-stub":
                a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
                print(
                    "SQS calls: "
                    + ", ".join(
                        f"{k[5:]}={v}"
                        for k, v in sorted(a.items())
                        if k.startswith("Bench")
                        and not k.startswith("BenchSend")
                        and not k.startswith("BenchGetQueueAttributes")
                    )
                )
            if t_accepted is None or t_invoked is None:
                raise SystemExit("did not finish within 900 s")
            acc, inv = t_accepted - t_ready, t_invoked - t_ready
            print(
                f"{server_kind}: {messages} messages accepted (queued + deleted from SQS) in "
                f"{acc:.2f}s, invoked in {inv:.2f}s"
            )
            return messages / acc, messages / inv
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
