"""Start the local services the tests need where they are missing (``make services``).

RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) run on the team's machines already;
on a fresh one this installs the Debian package of each one not installed
(``apt-get``) and starts each one not answering, with the commands those machines use,
then waits until it accepts connections. A service that cannot be started is an error
(exit 1) that names it: the tests that need it fail rather than skip. Kafka (tansu) and
S3/SQS (moto) are started by the tests themselves. PostgreSQL (127.0.0.1:5432, user
postgres, trust for 127.0.0.1: tests/pg_fixtures.py) gets its Debian cluster created,
opened to local trust and started where missing.

    python3 tests/services.py            # check, install, start, wait
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"


def answers(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)


def start_redis() -> None:
    for d in ("/var/lib/redis", "/var/log/redis"):
        os.makedirs(d, exist_ok=True)
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
         "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
         "--logfile", "/var/log/redis/ci.log"],
        check=True,
    )  # fmt: skip


def start_rabbitmq() -> None:
    subprocess.run(["rabbitmq-server", "-detached"], check=True)


def start_postgres() -> None:
    versions = sorted(os.listdir("/usr/lib/postgresql"), key=lambda v: int(v.split(".")[0]))
    version = versions[-1]
    clusters = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout
    if not any(line.split()[:2] == [version, "main"] for line in clusters.splitlines()):
        subprocess.run(["pg_createcluster", version, "main"], check=True)
    # the tests connect as postgres without a password, over TCP from 127.0.0.1 only
    hba = f"/etc/postgresql/{version}/main/pg_hba.conf"
    trust = "host all all 127.0.0.1/32 trust\n"
    with open(hba) as f:
        text = f.read()
    if trust not in text:
        with open(hba, "w") as f:
            f.write(trust + text)
    subprocess.run(["pg_ctlcluster", version, "main", "start"], check=True)


SERVICES = [
    # name, port, command, Debian package, how to start it, seconds to wait for it
    ("Redis", 6379, "redis-server", "redis-server", start_redis, 30.0),
    ("RabbitMQ", 5672, "rabbitmq-server", "rabbitmq-server", start_rabbitmq, 120.0),
    ("PostgreSQL", 5432, "pg_ctlcluster", "postgresql", start_postgres, 60.0),
]


def ensure(name: str, port: int, command: str, package: str, start, wait_s: float) -> str | None:  # type: ignore[no-untyped-def]
    """None when the service answers (started if needed), else what went wrong."""
    if answers(port):
        return None
    try:
        if shutil.which(command) is None:
            print(f"services: installing {package} (Debian)", flush=True)
            apt_install(package)
        print(f"services: starting {name} on {HOST}:{port}", flush=True)
        start()
    except (OSError, subprocess.CalledProcessError) as e:
        return f"{name}: could not be installed or started: {e}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if answers(port):
            return None
        time.sleep(0.5)
    return f"{name}: started, but {HOST}:{port} did not answer within {wait_s:.0f}s"


def main() -> int:
    problems = [p for s in SERVICES if (p := ensure(*s)) is not None]
    for p in problems:
        print(f"services: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
