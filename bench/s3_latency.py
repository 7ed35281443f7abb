"""Latency from ``put_object`` to handler start, S3 notifications mode (p50 / p99).

A moto server (S3 with real S3 → SQS notifications) and the real daemon with one
``aws_s3`` trigger in ``mode = "notifications"``: long poll ``wait_time = 20s`` (SQS'
maximum; a receive returns as soon as a message arrives, so the poll length adds no
latency, only its wake-up does), batches of 10, ``visibility_timeout = 30s``; a python
function (``concurrency = 4``) that records ``time.time()`` as its first statement.
Objects are put one at a time, each after the previous event arrived, with a random gap
of 0-50 ms, so every put finds the daemon idle in its long poll.

What the latency covers: moto writing the notification to SQS (inside put_object),
the long poll waking, the SQS → COS mapping, the durable queue's commit, the SQS delete,
the queue runner claiming the event and the python worker starting the handler.

Usage: python bench/s3_latency.py [--puts N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

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
HANDLER = """
import json, os, time

def main_handler(event, context):
    t = time.time()
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"t": t, "key": event["Records"][0]["cos"]["cosObject"]["key"]}) + "\\n")
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--puts", type=int, default=300)
    args = ap.parse_args()

    import boto3

    os.environ.update(ENV)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon = None
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("moto_server did not start")
            time.sleep(0.05)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="latency")
        url = sqs.create_queue(QueueName="latency")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        s3.put_bucket_notification_configuration(
            Bucket="latency",
            NotificationConfiguration={
                "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
            },
        )
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            out = root / "out.jsonl"
            (root / "fn").mkdir()
            (root / "fn" / "index.py").write_text(HANDLER)
            (root / "bridge.toml").write_text(
                textwrap.dedent(
                    f"""
                    [daemon]
                    state_dir = "state"
                    log_level = "warning"

                    [functions.rec]
                    code = "fn"
                    concurrency = 4
                    environment = {{ OUT = "{out}" }}

                    [triggers.objects]
                    type = "aws_s3"
                    mode = "notifications"
                    function = "rec"
                    queue_url = "{url}"
                    endpoint_url = "{endpoint}"
                    region = "us-east-1"
                    wait_time = "20s"
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
                # warm up: the s3:TestEvent is skipped; one object warms the worker
                s3.put_object(Bucket="latency", Key="warm-up", Body=b"x")
                while not out.exists():
                    if daemon.poll() is not None:
                        raise SystemExit(log.read_text())
                    time.sleep(0.01)
                lat: list[float] = []
                rnd = random.Random(1)
                for i in range(args.puts):
                    time.sleep(rnd.uniform(0, 0.05))
                    n = len(out.read_text().splitlines())
                    t0 = time.time()
                    s3.put_object(Bucket="latency", Key=f"k/{i}", Body=b"hello")
                    while len(lines := out.read_text().splitlines()) <= n:
                        time.sleep(0.0005)
                    rec = json.loads(lines[-1])
                    assert rec["key"].endswith(f"/k/{i}"), rec
                    lat.append((rec["t"] - t0) * 1000)
                daemon.terminate()
                daemon.wait(60)
        print(
            f"put_object → handler start over {len(lat)} puts: p50 {statistics.median(lat):.1f} ms, "
            f"p99 {pct(lat, 99):.1f} ms, max {max(lat):.1f} ms "
            f"(notifications mode, moto S3→SQS, wait_time 20s long poll, batches of 10)"
        )
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
