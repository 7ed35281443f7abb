"""Start-up of an SCF project: ``run -c serverless.yml`` vs a plain bridge.toml, and the first
(uncached) build of a small requirements file.

Three figures, side by side in one run:

- **toml**: ``event-bridge run -c bridge.toml`` with one Python function (no requirements) and
  a timer, from spawning the process to its "ready:" log line;
- **yaml, cached deps**: ``event-bridge run -c serverless.yml`` for the same function and timer
  written as a Serverless Components project, whose ``requirements.txt`` environment is already
  built (hashed and found under the state directory);
- **first build**: ``event-bridge install`` of that requirements file into an empty state
  directory (pip ``--target``; a pure-python wheel written here, so no network is involved:
  the figure is pip's own overhead, not a download).

    .venv/bin/python bench/project_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

EXE = str(Path(sys.executable).with_name("event-bridge"))
ENV = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

INDEX = "import tinypkg\n\ndef main_handler(event, context):\n    return tinypkg.VERSION\n"
YAML = """component: scf
name: bench
inputs:
  name: bench
  src: ./src
  handler: index.main_handler
  runtime: Python3.11
  events:
    - timer:
        parameters:
          name: tick
          cronExpression: '0 0 3 * * * *'
"""
TOML = """[functions.bench]
code = "plain"
[triggers.tick]
type = "timer"
function = "bench"
cron = "0 0 3 * * * *"
"""


def wheel(where: Path) -> Path:
    files = {
        "tinypkg/__init__.py": 'VERSION = "0.1.0"\n',
        "tinypkg-0.1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1.0\n",
        "tinypkg-0.1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: bench\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    rec = [
        f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},{len(t)}"
        for n, t in files.items()
    ]
    whl = where / "tinypkg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for n, t in files.items():
            zf.writestr(n, t)
        zf.writestr(
            "tinypkg-0.1.0.dist-info/RECORD", "\n".join([*rec, "tinypkg-0.1.0.dist-info/RECORD,,"])
        )
    return whl


def project(root: Path) -> None:
    (root / "src" / "wheels").mkdir(parents=True)
    (root / "src" / "index.py").write_text(INDEX)
    wheel(root / "src" / "wheels")
    (root / "src" / "requirements.txt").write_text("./wheels/tinypkg-0.1.0-py3-none-any.whl\n")
    (root / "serverless.yml").write_text(YAML)
    (root / "bridge.toml").write_text(TOML)
    (root / "plain").mkdir()
    (root / "plain" / "index.py").write_text("def main_handler(event, context):\n    return 1\n")


def ready_ms(config: Path) -> float:
    log = config.parent / "log"
    with log.open("w") as fh:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [EXE, "run", "-c", str(config)], stdout=fh, stderr=subprocess.STDOUT, env=ENV
        )
        try:
            while "ready:" not in log.read_text():
                if proc.poll() is not None:
                    raise SystemExit(f"daemon exited:\n{log.read_text()}")
                time.sleep(0.002)
            return (time.monotonic() - t0) * 1000
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    toml, yaml, build = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        project(root)
        for _ in range(args.runs):
            shutil.rmtree(root / "state", ignore_errors=True)
            t0 = time.monotonic()
            r = subprocess.run(
                [EXE, "install", "-c", str(root / "serverless.yml")],
                capture_output=True,
                text=True,
                env=ENV,
            )
            if r.returncode:
                raise SystemExit(r.stderr)
            build.append((time.monotonic() - t0) * 1000)
            toml.append(ready_ms(root / "bridge.toml"))
            yaml.append(ready_ms(root / "serverless.yml"))
    med = statistics.median
    print(f"runs: {args.runs} (median; min-max)")
    print(f"  toml start to READY        {med(toml):7.0f} ms  ({min(toml):.0f}-{max(toml):.0f})")
    print(f"  yaml start, cached deps    {med(yaml):7.0f} ms  ({min(yaml):.0f}-{max(yaml):.0f})")
    print(f"  yaml - toml                {med(yaml) - med(toml):+7.0f} ms")
    print(f"  first install (uncached)   {med(build):7.0f} ms  ({min(build):.0f}-{max(build):.0f})")


if __name__ == "__main__":
    main()
