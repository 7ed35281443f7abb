"""The plugin-facing API, declared in one place: everything a source, target or dead-letter
sink plugin may import from event-bridge. The rest of ``bridge`` is internal and may change
without notice; an import-linter contract (``.importlinter``, run by ``make lint``) holds
the built-in sources and the example plugin to this module (and :mod:`bridge.testing` in
their tests).

::

    from bridge.plugin import Delivery, Event, Kind, SettleDelivery, Source, TriggerConfig

What is here, by concern (each name is documented where it is defined):

- the contracts (:mod:`bridge.abc`): :class:`Source` (and its easier tiers
  :class:`GeneratorSource`, :class:`PollingSource`), :class:`Delivery`, the generic
  :class:`SettleDelivery`, :class:`Undeliverable` (the core's path for a message a source
  can never handle: it is dead-lettered, then acked), the signals :class:`EndOfInput`,
  :class:`NotConnected`, :class:`BackOff`, :class:`SourceContext` (its ``store``, a
  :class:`StateStore`, keeps a source's positions); :class:`Target`,
  :class:`Invocation`, :class:`TargetContext`; :class:`DeadLetterSink`,
  :class:`DeadLetterContext`; :class:`HttpTrigger`;
- config models and field types (:mod:`bridge.models`): :class:`TriggerConfig`,
  :class:`FunctionConfig`, ``Duration``, ``Size``, ``TimeZone``, ``RelPath``,
  :func:`read_secret_file`; :class:`OrderedConfig` for ordered triggers;
- events (:mod:`bridge.events`): :class:`Event`, :class:`Kind`, :class:`Format`, the
  record builders (``timer_event``, ``cos_record``, ``cmq_record``, ``ckafka_record``),
  :func:`render`, and :class:`RawEvent` (an event already encoded, which a source may hand
  over with its delivery: ``SettleDelivery(encoded=...)``);
- errors (:mod:`bridge.errors`): the tree under :class:`BridgeError`;
- helpers: :class:`SettledPrefix` (checkpoint a position only past contiguous acks),
  :class:`ShardedState` (a large map kept in shards), :class:`GroupTurns` (one in flight
  per message group),
  :class:`Worker`, :class:`Feed` and :class:`Closed` (blocking SDKs),
  :func:`register_secret` (keep a secret out of the logs), :func:`parse_schedule`;
- dead-letter sink URLs (:mod:`bridge.sinks`): :func:`parse_sink`,
  :func:`sink_error`, :class:`SinkUrl`; the store protocol :class:`StateStore`.
"""

from __future__ import annotations

from bridge.abc import (
    BackOff,
    DeadLetterContext,
    DeadLetterSink,
    Delivery,
    EndOfInput,
    GeneratorSource,
    HttpTrigger,
    Invocation,
    NotConnected,
    PollingSource,
    SettleDelivery,
    Source,
    SourceContext,
    SourceSignal,
    Target,
    TargetContext,
    Undeliverable,
)
from bridge.blocking import Closed, Feed, Worker
from bridge.checkpoint import GroupTurns, SettledPrefix, ShardedState
from bridge.cron import Schedule, parse_schedule
from bridge.errors import (
    BadEvent,
    BadResult,
    BridgeError,
    ConfigError,
    ErrorClass,
    FunctionError,
    FunctionTimeout,
    InvalidRequest,
    InvocationError,
    NonZeroExit,
    OutOfMemory,
    PluginError,
    SystemFault,
    Throttled,
)
from bridge.events import (
    Event,
    Format,
    Kind,
    RawEvent,
    ckafka_record,
    cmq_record,
    cos_record,
    render,
    timer_event,
)
from bridge.log import register_secret
from bridge.models import (
    Duration,
    FunctionConfig,
    RelPath,
    Size,
    TimeZone,
    TriggerConfig,
    read_secret_file,
)
from bridge.retry import OrderedConfig
from bridge.sinks import SinkUrl, SinkUrlError
from bridge.sinks import error as sink_error
from bridge.sinks import parse as parse_sink
from bridge.store import StateStore

__all__ = [
    "BackOff",
    "BadEvent",
    "BadResult",
    "BridgeError",
    "Closed",
    "ConfigError",
    "DeadLetterContext",
    "DeadLetterSink",
    "Delivery",
    "Duration",
    "EndOfInput",
    "ErrorClass",
    "Event",
    "Feed",
    "Format",
    "FunctionConfig",
    "FunctionError",
    "FunctionTimeout",
    "GeneratorSource",
    "GroupTurns",
    "HttpTrigger",
    "InvalidRequest",
    "Invocation",
    "InvocationError",
    "Kind",
    "NonZeroExit",
    "NotConnected",
    "OrderedConfig",
    "OutOfMemory",
    "PluginError",
    "PollingSource",
    "RawEvent",
    "RelPath",
    "Schedule",
    "SettleDelivery",
    "SettledPrefix",
    "ShardedState",
    "SinkUrl",
    "SinkUrlError",
    "Size",
    "Source",
    "SourceContext",
    "SourceSignal",
    "StateStore",
    "SystemFault",
    "Target",
    "TargetContext",
    "Throttled",
    "TimeZone",
    "TriggerConfig",
    "Undeliverable",
    "Worker",
    "ckafka_record",
    "cmq_record",
    "cos_record",
    "parse_schedule",
    "parse_sink",
    "read_secret_file",
    "register_secret",
    "render",
    "sink_error",
    "timer_event",
]
