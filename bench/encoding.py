"""Event encoding: the standard library's json against orjson and msgspec, per event.

Encodes (and decodes) the SCF rendering of a timer tick, a Kafka batch of ten 100-byte
records and an object-storage record, and prints microseconds per call. This is how the
encoder of ``bridge.events.dumps`` was picked (orjson).

    .venv/bin/python bench/encoding.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import json
import timeit
from datetime import UTC, datetime

import msgspec  # pip install msgspec (only this benchmark uses it)
import orjson

from bridge.events import Event, Kind, ckafka_record, cos_record, render, timer_event


def main(n: int) -> None:
    now = datetime.now(UTC)
    samples = {
        "timer": render(timer_event("t1", now, "hello")),
        "ckafka x10": render(
            Event(
                kind=Kind.CKAFKA,
                trigger="k",
                time=now,
                records=[
                    ckafka_record(topic="t", partition=0, offset=i, key=b"k", value=b"v" * 100)
                    for i in range(10)
                ],
            )
        ),
        "cos": render(
            Event(
                kind=Kind.COS,
                trigger="c",
                time=now,
                records=[
                    cos_record(
                        bucket="b", key="a/b.txt", event_name="cos:ObjectCreated:Put", time=now
                    )
                ],
            )
        ),
    }
    enc = msgspec.json.Encoder()
    print("microseconds per call     encode: json  orjson msgspec | decode: json  orjson msgspec")
    for name, obj in samples.items():
        raw = orjson.dumps(obj)
        e = [
            timeit.timeit(f, number=n) / n * 1e6
            for f in (
                lambda o=obj: json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode(),
                lambda o=obj: orjson.dumps(o),
                lambda o=obj: enc.encode(o),
                lambda r=raw: json.loads(r),
                lambda r=raw: orjson.loads(r),
                lambda r=raw: msgspec.json.decode(r),
            )
        ]
        print(
            f"  {name:<12} {e[0]:14.2f} {e[1]:7.2f} {e[2]:7.2f} | {e[3]:12.2f} {e[4]:7.2f} {e[5]:7.2f}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100_000)
    main(ap.parse_args().calls)
