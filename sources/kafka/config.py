"""The Kafka trigger's configuration: ``[triggers.NAME]`` with ``type = "kafka"``, and the
librdkafka properties the bridge owns, defaults and masks."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import Field, ValidationInfo, field_validator, model_validator

from bridge.plugin import (
    Duration,
    OrderedConfig,
    RelPath,
    Size,
    TriggerConfig,
    read_secret_file,
)

MAX_BATCH_SIZE = 10_000  # SCF's CKafka trigger allows up to 10,000 records per batch
MAX_EVENT_BYTES = 6 * 1024 * 1024  # the dispatcher's sync event limit (SCF: 6 MB)

#: librdkafka properties the bridge sets itself, and the key that sets them instead
OWNED_OPTIONS = {
    "bootstrap.servers": "use bootstrap_servers",
    "metadata.broker.list": "use bootstrap_servers",
    "group.id": "use group_id",
    "auto.offset.reset": "use start",
    "enable.auto.commit": "the bridge commits offsets itself, only once records are settled",
    "enable.auto.offset.store": "the bridge stores offsets itself, only once records are settled",
}
#: confluent-kafka keys that take Python callables: the bridge installs its own
CALLBACK_OPTIONS = ("error_cb", "throttle_cb", "stats_cb", "oauth_cb", "on_commit", "logger")
#: defaults a trigger's ``options`` may override
DEFAULT_OPTIONS = {
    "queued.max.messages.kbytes": "16384",  # librdkafka's prefetch, all partitions (16 MiB)
    "fetch.wait.max.ms": "100",  # a resumed partition waits for the fetch in flight
    # librdkafka backs a partition off for 1 s when its prefetch queue looked full: with a
    # buffer drained in bursts (a batch of 1,000 at a time) that stalled every partition
    "fetch.queue.backoff.ms": "10",
}
SECRET_OPTION = re.compile(r"password|secret|\.key\.pem|sasl\.jaas|credential", re.IGNORECASE)
_SERVER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")


def parse_start(value: str, zone: ZoneInfo) -> int | None:
    """``"latest"``/``"earliest"`` → None; an ISO 8601 time → Unix milliseconds (a time
    without an offset is read in ``zone``)."""
    if value in ("latest", "earliest"):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f'invalid start "{value}": use "latest", "earliest" or an ISO 8601 time such '
            'as "2024-05-01T08:00:00Z"'
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=zone)
    return int(t.timestamp() * 1000)


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValueError(f"a librdkafka property value must be a string, not {type(value).__name__}")


def _check_option_names(names: Iterable[str], where: str) -> None:
    for name in names:
        if name in OWNED_OPTIONS:
            raise ValueError(f'{where} "{name}" is set by the bridge: {OWNED_OPTIONS[name]}')
        if name in CALLBACK_OPTIONS:
            raise ValueError(f'{where} "{name}" is a callback; the bridge installs its own')


#: a property no librdkafka has, set after the options checked (see _check_with_librdkafka)
_END_OF_OPTIONS = "event-bridge.end-of-options"


def _check_with_librdkafka(options: dict[str, str]) -> None:
    """librdkafka's own check of the options' names and values (a typo would otherwise be
    retried forever as if the brokers could not be reached), without creating a client:
    they are set in order, then a property no librdkafka has, which stops the construction
    where every option before it is valid. A secret's value is never echoed."""
    import confluent_kafka

    if "plugin.library.paths" in options:  # (setting it loads the library: at connect only)
        return
    try:
        client = confluent_kafka.Consumer({"group.id": "check", **options, _END_OF_OPTIONS: "1"})
    except (confluent_kafka.KafkaException, TypeError, ValueError, AttributeError) as e:
        err = e.args[0] if e.args else None
        text = err.str() if isinstance(err, confluent_kafka.KafkaError) else str(e)
        if f'"{_END_OF_OPTIONS}"' in text:
            return
        for name, value in options.items():
            if value and SECRET_OPTION.search(name):
                text = text.replace(value, "***")
        raise ValueError(f"librdkafka rejects the options: {text}") from None
    client.close()  # (not reached: librdkafka has no such property)


class KafkaConfig(TriggerConfig):
    """``[triggers.NAME]`` with ``type = "kafka"``."""

    bootstrap_servers: str = Field(
        description='Brokers to bootstrap from: "host:port", comma-separated or a list.'
    )
    topic: str | list[str] = Field(
        description="Topic(s) to consume: a name, a list of names, or a regex starting with ^ "
        '(e.g. "^orders-.*").'
    )
    group_id: str | None = Field(
        None,
        validate_default=True,
        description='Consumer group; default "event-bridge-<trigger name>". Replicas of the '
        "bridge with the same group split the partitions.",
    )
    start: str = Field(
        "latest",
        description='Where a partition without a committed offset starts: "latest", '
        '"earliest", or an ISO 8601 time (the first record at or after it; without an '
        "offset the time is in daemon.timezone).",
    )
    batch_size: int = Field(
        100, ge=1, le=MAX_BATCH_SIZE, description="Most records per invocation (1-10,000)."
    )
    batch_window: Duration = Field(
        0.5,
        ge=0,
        le=900,
        description="How long the oldest buffered record of a partition waits for the batch to "
        'fill before a partial batch is delivered ("0s": at once).',
    )
    max_batch_bytes: Size = Field(
        6_000_000,
        gt=0,
        le=MAX_EVENT_BYTES,
        description="Most bytes of records per invocation (SCF: 6 MB); a larger record travels "
        "alone.",
    )
    options: dict[str, str] = Field(
        {},
        repr=False,
        description='librdkafka properties passed as-is, e.g. {"session.timeout.ms" = "6000", '
        '"security.protocol" = "SASL_SSL"}. group.id, bootstrap.servers, auto.offset.reset and '
        "auto commit are the bridge's. librdkafka checks names and values at validate.",
    )
    options_file: dict[str, RelPath] = Field(
        {},
        description='librdkafka properties read from files (secrets), e.g. {"sasl.password" = '
        '"/run/credentials/event-bridge.service/kafka"}; read at connect, masked in logs.',
    )
    drain_timeout: Duration = Field(
        10.0,
        ge=0,
        le=900,
        description="On a rebalance, how long in-flight batches of revoked partitions may take "
        "to settle (and be committed) before they are abandoned to the next owner. Keep it "
        "well under max.poll.interval.ms: the group waits.",
    )
    retry: OrderedConfig = Field(
        OrderedConfig(),
        description="Retry policy of a failed batch (in place: the partition waits), then "
        "dead-letter.",
    )

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _servers(cls, v: Any) -> Any:
        if isinstance(v, list):
            v = ",".join(str(s) for s in v)
        if not isinstance(v, str):
            return v
        servers = [s.strip() for s in v.split(",") if s.strip()]
        if not servers:
            raise ValueError('no broker given: use "host:port"')
        for s in servers:
            if not _SERVER.match(s.removeprefix("PLAINTEXT://").removeprefix("SSL://")):
                raise ValueError(f'invalid broker "{s}": use host:port, e.g. "kafka-1:9092"')
        return ",".join(servers)

    @field_validator("topic")
    @classmethod
    def _topics(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("give at least one topic")
        for name in names:
            if not name.strip():
                raise ValueError("a topic name cannot be empty")
            if name.startswith("^"):
                try:
                    re.compile(name)
                except re.error as e:
                    raise ValueError(f'invalid topic regex "{name}": {e}') from None
        return v

    @field_validator("group_id")
    @classmethod
    def _group(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("group_id cannot be empty")
        name = (info.context or {}).get("name")
        return v if v is not None or name is None else f"event-bridge-{name}"

    @field_validator("start")
    @classmethod
    def _start(cls, v: str, info: ValidationInfo) -> str:
        parse_start(v, ZoneInfo((info.context or {}).get("timezone", "UTC")))
        return v

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = {str(k): _option_text(x) for k, x in v.items()}
            _check_option_names(v, "option")
            _check_with_librdkafka(v)
        return v

    @field_validator("options_file")
    @classmethod
    def _options_file(cls, v: dict[str, Path]) -> dict[str, Path]:
        _check_option_names(v, "options_file")
        for path in v.values():
            read_secret_file(path)  # readable now, or a clear error at the key path
        return v

    @model_validator(mode="after")
    def _no_overlap(self) -> KafkaConfig:
        both = sorted(set(self.options) & set(self.options_file))
        if both:
            raise ValueError(f"{', '.join(both)}: set in both options and options_file")
        return self

    @property
    def topics(self) -> list[str]:
        return [self.topic] if isinstance(self.topic, str) else list(self.topic)
