"""The daemon: wires config, state store, function targets, dispatcher, queue and sources.

Usage::

    async with Daemon(config) as d:
        await d.run_until_stopped()

Entering opens the state store, starts the function targets (warm workers) and
the durable queue. ``run_until_stopped`` runs, in one task group, the queue's
runner, one pump per enabled trigger, the HTTP API and the systemd watchdog,
until :meth:`Daemon.request_stop` (SIGTERM/SIGINT).

- A pump takes a global in-flight slot, reads one delivery and hands it to its
  acceptor (the durable queue, or the ordered invoker for Kafka-style sources)
  in a task that releases the slot when done. A source that fails to connect is
  retried with backoff while the other triggers keep running.
- SIGHUP reloads (:meth:`Daemon.reload`): a bad config is logged and the old
  one keeps running; a good one starts added triggers, stops removed ones after
  their in-flight events settle, and swaps changed functions (running
  invocations finish on the old code).
- Stopping: pumps stop reading, in-flight deliveries get ``shutdown_grace`` to
  settle (acked ones are committed upstream), then sources are closed, and the
  targets and the store (each cleanup on an AsyncExitStack, so all run even if
  one fails). A second signal exits at once; accepted events are on disk.

systemd: READY=1 once every source connected, STATUS= summaries, WATCHDOG=1 at
half of ``WATCHDOG_USEC`` from the event loop, RELOADING=1 + MONOTONIC_USEC and
READY=1 around a reload, STOPPING=1 on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import signal
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from bridge import __version__, registry, systemd
from bridge import config as cfg
from bridge.abc import (
    BackOff,
    DeadLetterContext,
    DeadLetterSink,
    Delivery,
    EndOfInput,
    HttpTrigger,
    NotConnected,
    Source,
    SourceContext,
    Target,
    TargetContext,
)
from bridge.config import Config, TriggerConfig
from bridge.deadletter import open_sink
from bridge.dispatcher import Acceptor, Dispatcher
from bridge.errors import ConfigError
from bridge.metrics import Metrics
from bridge.ordered import OrderedInvoker
from bridge.queue import DurableQueue
from bridge.retry import OrderedConfig
from bridge.store import SqliteStore, StateStore

if TYPE_CHECKING:
    from bridge.api import Api
    from bridge.gateway import Gateway

log = logging.getLogger("bridge.daemon")


class RunState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def build_targets(config: Config, names: list[str] | None = None) -> dict[str, Target[Any]]:
    """Instantiate the function targets (not started)."""
    out: dict[str, Target[Any]] = {}
    for name, fc in config.functions.items():
        if names is not None and name not in names:
            continue
        cls = registry.target(fc.runtime)
        ctx = TargetContext(
            name=name, state_dir=config.state_dir, logger=logging.getLogger(f"fn.{name}")
        )
        out[name] = cls(fc, ctx)
    return out


def log_skipped(config: Config) -> None:
    """What the config leaves out because a plugin fails to load: one error line each."""
    for where, why in config.skipped.items():
        kind, _, name = where.partition(".")
        extra = {"trigger": name} if kind == "triggers" else {"function": name}
        log.error("%s is not run: %s", where, why, extra=extra)


def is_http_trigger(tc: TriggerConfig) -> bool:
    """Served by the gateway (``apigw``, ``function_url``, plugins' HttpTrigger): no pump."""
    return issubclass(registry.source(tc.type), HttpTrigger)


def build_source(config: Config, name: str, store: StateStore) -> Source[Any]:
    tc = config.triggers[name]
    cls = registry.source(tc.type)
    ctx = SourceContext(
        name=name,
        function=tc.function,
        store=store,
        timezone=ZoneInfo(config.daemon.timezone),
        logger=logging.getLogger(f"trigger.{name}"),
    )
    return cls(tc, ctx)


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        store: StateStore | None = None,
        targets: Mapping[str, Target[Any]] | None = None,
        sources: Mapping[str, Source[Any]] | None = None,
    ) -> None:
        """``store``, ``targets`` and ``sources`` replace the configured ones (tests, embedding)."""
        self.config = config
        self.state = RunState.STARTING
        self.metrics = Metrics()
        self.store = store or SqliteStore(config.state_dir)
        self.dispatcher = Dispatcher(
            targets if targets is not None else build_targets(config),
            max_in_flight=config.daemon.max_in_flight,
            metrics=self.metrics,
        )
        self.sinks: dict[str, DeadLetterSink] = {}
        self._opened_sinks: dict[str, DeadLetterSink] = {}
        self.queue: DurableQueue | None = None
        self.ordered: OrderedInvoker | None = None
        self.acceptor: Acceptor | None = None  # the durable queue, once open
        self.api: Api | None = None
        self.gateway: Gateway | None = None
        self._given_sources = sources
        self.sources: dict[str, Source[Any]] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._inflight: dict[str, set[asyncio.Task[None]]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._connected: set[str] = set()
        self._t0 = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self.ready = asyncio.Event()
        self.metrics.add_state(self._metric_state)

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Daemon:
        self._t0 = time.monotonic()
        log_skipped(self.config)
        try:
            await self.store.open()
            self._stack.push_async_callback(self.store.close)
            self._stack.push_async_callback(self.dispatcher.close)
            await self.dispatcher.start()
            await self._open_queue()
            if self._given_sources is not None:
                self.sources = dict(self._given_sources)
            else:
                for name, tc in self.config.triggers.items():
                    if tc.enabled and not is_http_trigger(tc):
                        self.sources[name] = build_source(self.config, name, self.store)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    def _sink(self, spec: str) -> DeadLetterSink:
        if spec not in self._opened_sinks:
            dctx = DeadLetterContext(
                store=self.store, logger=logging.getLogger("bridge.deadletter")
            )
            self._opened_sinks[spec] = sink = open_sink(spec, dctx)
            self._stack.push_async_callback(sink.close)
        return self._opened_sinks[spec]

    async def _open_queue(self) -> None:
        for name, fc in self.config.functions.items():
            self.sinks[name] = self._sink(fc.async_.dead_letter)
        self.queue = DurableQueue(
            self.config, self.store, self.dispatcher, self.sinks, self.metrics
        )
        await self.queue.start()
        self.acceptor = self.queue
        self.ordered = OrderedInvoker(
            self.dispatcher, self.store, self.sinks, self._ordered_policy, self.metrics
        )

    def _ordered_policy(self, trigger: str) -> OrderedConfig:
        retry = getattr(self.config.triggers.get(trigger), "retry", None)
        return retry if isinstance(retry, OrderedConfig) else OrderedConfig()

    def acceptor_for(self, trigger: str) -> Acceptor:
        """Ordered sources are invoked in place; every other delivery goes to the queue."""
        src = self.sources.get(trigger)
        if src is not None and type(src).ordered and self.ordered is not None:
            return self.ordered
        assert self.acceptor is not None, "the daemon is not entered"
        return self.acceptor

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._close_sources()
        finally:
            await self._stack.aclose()
            self.state = RunState.STOPPED
            log.info("stopped")

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: no new events; waiting for in-flight invocations")
            systemd.notify("STOPPING=1", "STATUS=stopping: draining in-flight invocations")
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("second %s: exiting now (accepted events stay queued on disk)", sig.name)
            raise SystemExit(1)
        log.info("received %s", sig.name)
        self.request_stop()

    def _on_hup(self) -> None:
        log.info("received SIGHUP: reloading %s", self.config.path)
        if self._tg is not None and not self._stop.is_set():
            self._tg.create_task(self.reload(), name="reload")

    async def run_until_stopped(self) -> None:
        self.state = RunState.RUNNING
        grace = self.config.daemon.shutdown_grace
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if self.queue is not None:
                tg.create_task(self.queue.run(self._stop), name="queue")
            if self.config.api.enabled:
                from bridge.api import Api

                self.api = Api(self)
                await self.api.start()
            await self._start_gateway()
            watchdog = tg.create_task(self._watchdog(), name="watchdog")
            for name, src in self.sources.items():
                self._start_pump(name, src)
            if not self.sources:
                self._mark_ready()
            # What start-up built lives as long as the daemon: keep it out of the cyclic GC's
            # scans, whose full collections otherwise pause the loop for tens of milliseconds
            # when many triggers fire at once.
            gc.freeze()
            await self._stop.wait()
            self.state = RunState.STOPPING
            # the gateway stops accepting and drains its requests alongside the triggers
            gateway = self.gateway
            gw_closed = tg.create_task(gateway.close()) if gateway is not None else None
            # 1. stop reading; 2. let what was read settle; 3. close sources (commit acks)
            for p in self._pumps.values():
                p.cancel()
            inflight = {t for ts in self._inflight.values() for t in ts}
            if inflight:
                _, pending = await asyncio.wait(inflight, timeout=grace)
                if pending:
                    log.warning(
                        "%d deliveries still in flight after the %.0fs grace period; abandoning "
                        "them unacknowledged (the upstream redelivers them)",
                        len(pending),
                        grace,
                    )
                    for t in pending:
                        t.cancel()
            await self._close_sources()
            if gw_closed is not None:
                await gw_closed
            if self.api is not None:
                await self.api.close()
            watchdog.cancel()
        self._tg = None

    async def _start_gateway(self) -> None:
        """The public HTTP listener, when the config has HTTP triggers (bridge.gateway)."""
        from bridge.gateway import Gateway, wanted

        if self.gateway is None and wanted(self.config):
            gateway = Gateway(self)
            await gateway.start()
            self.gateway = gateway

    def _mark_ready(self) -> None:
        if not self.ready.is_set():
            ms = (time.monotonic() - self._t0) * 1000
            log.info(
                "ready: %d functions, %d triggers running (started in %.0f ms)",
                len(self.dispatcher.functions),
                self._running_triggers(),
                ms,
            )
            systemd.notify("READY=1", f"STATUS={self.summary()}")
            self.ready.set()

    def _running_triggers(self) -> int:
        """Sources with a pump, plus HTTP triggers served by the gateway."""
        return len(self.sources) + (len(self.gateway.table) if self.gateway is not None else 0)

    def summary(self) -> str:
        depth = self.queue.depth if self.queue is not None else 0
        return (
            f"{self.state.value}: {len(self.dispatcher.functions)} functions, "
            f"{self._running_triggers()} triggers, {self.dispatcher.in_flight()} in flight, "
            f"{depth} queued"
        )

    async def _watchdog(self) -> None:
        """WATCHDOG=1 every half of WATCHDOG_USEC, sent from the event loop itself: a wedged
        loop stops the pings and systemd restarts the service."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        pid = os.environ.get("WATCHDOG_PID")
        if usec <= 0 or (pid and pid.isdigit() and int(pid) != os.getpid()):
            return
        interval = usec / 2e6
        while True:
            systemd.notify("WATCHDOG=1", f"STATUS={self.summary()}")
            await asyncio.sleep(interval)

    async def _close_sources(self) -> None:
        for name in list(self.sources):
            await self._close_source(name)

    async def _close_source(self, name: str) -> None:
        src = self.sources.get(name)
        if src is None:
            return
        try:
            await src.close()
        except Exception as e:
            log.error(
                "closing trigger %s failed: %s", name, e, exc_info=True, extra={"trigger": name}
            )

    # --- reload ------------------------------------------------------------------------------

    async def reload(self, new: Config | None = None) -> bool:
        """Apply a new config without losing events (see the module docstring). Returns
        whether it was applied; a bad config leaves the running one untouched."""
        async with self._reload_lock:
            if new is None:
                if self.config.path is None:
                    log.error("reload: this daemon has no config file to reload")
                    return False
                try:
                    new = cfg.load(self.config.path, skip_unbound=self.config.skip_unbound)
                except ConfigError as e:
                    for loc, msg in e.problems:
                        log.error("reload rejected: %s: %s", loc, msg)
                    log.error(
                        "reload rejected (%d problems); still running the previous config",
                        len(e.problems),
                    )
                    self.metrics.reloads.labels("rejected").inc()
                    systemd.notify(
                        f"STATUS=reload rejected ({len(e.problems)} problems); {self.summary()}"
                    )
                    return False
            systemd.notify(
                "RELOADING=1",
                f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
            )
            try:
                await self._apply(new)
            except Exception as e:
                log.error("reload failed: %s; running what could be applied", e, exc_info=True)
                self.metrics.reloads.labels("failed").inc()
                systemd.notify("READY=1", f"STATUS=reload failed: {e}; {self.summary()}")
                return False
            self.metrics.reloads.labels("applied").inc()
            systemd.notify("READY=1", f"STATUS={self.summary()}")
            return True

    async def _apply(self, new: Config) -> None:
        old = self.config
        log_skipped(new)
        grace = new.daemon.shutdown_grace
        for key in ("state_dir", "max_in_flight", "max_queued", "timezone"):
            if getattr(old.daemon, key) != getattr(new.daemon, key):
                log.warning("reload: daemon.%s changed; it takes effect after a restart", key)
        if old.api != new.api:
            log.warning("reload: [api] changed; it takes effect after a restart")
        changed_fns = {
            n
            for n in old.functions.keys() & new.functions.keys()
            if old.functions[n] != new.functions[n]
        }
        added_fns = new.functions.keys() - old.functions.keys()
        removed_fns = old.functions.keys() - new.functions.keys()
        changed_trigs = {
            n
            for n in old.triggers.keys() & new.triggers.keys()
            if old.triggers[n] != new.triggers[n]
        }
        removed_trigs = (old.triggers.keys() - new.triggers.keys()) | changed_trigs
        added_trigs = (new.triggers.keys() - old.triggers.keys()) | changed_trigs

        # 1. triggers that go away (or change) stop reading and settle what they read
        await asyncio.gather(
            *(self._stop_trigger(n, grace) for n in removed_trigs if n in self.sources)
        )
        # 2. functions: new code takes new invocations; running ones finish on the old code
        new_targets = build_targets(new, sorted(added_fns | changed_fns))
        for name in sorted(added_fns | changed_fns):
            await self.dispatcher.replace(name, new_targets[name], grace)
            log.info("reload: function %s %s", name, "updated" if name in changed_fns else "added")
        # HTTP routes: added ones now reach started functions, removed ones stop before
        # their functions go (requests in flight keep the route they matched)
        if self.gateway is not None:
            self.gateway.update(new)
        for name in sorted(removed_fns):
            await self.dispatcher.replace(name, None, grace)
            log.info("reload: function %s removed (its queued events wait for it)", name)
        # 3. the queue and the dead-letter sinks follow the new config
        self.config = new
        for name, fc in new.functions.items():
            self.sinks[name] = self._sink(fc.async_.dead_letter)
        for name in removed_fns:
            self.sinks.pop(name, None)
        if self.queue is not None:
            self.queue.reconfigure(new)
        # 4. triggers that are new (or changed) start
        for name in sorted(added_trigs):
            tc = new.triggers[name]
            if not tc.enabled or is_http_trigger(tc):
                continue
            src = build_source(new, name, self.store)
            self.sources[name] = src
            self._start_pump(name, src)
            log.info(
                "reload: trigger %s %s", name, "restarted" if name in changed_trigs else "added"
            )
        if self.gateway is None and self._tg is not None:
            await self._start_gateway()
        log.info(
            "reload applied: %d functions, %d triggers",
            len(self.dispatcher.functions),
            self._running_triggers(),
        )

    async def _stop_trigger(self, name: str, grace: float) -> None:
        pump = self._pumps.pop(name, None)
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        inflight = self._inflight.pop(name, set())
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=grace)
            for t in pending:
                t.cancel()
        await self._close_source(name)
        self.sources.pop(name, None)
        self._connected.discard(name)
        log.info("reload: trigger %s stopped", name)

    # --- pumps -------------------------------------------------------------------------------

    def _start_pump(self, name: str, src: Source[Any]) -> None:
        assert self._tg is not None
        self._inflight[name] = set()
        self._pumps[name] = self._tg.create_task(self._pump(name, src), name=f"pump:{name}")

    async def _connect(self, name: str, src: Source[Any]) -> None:
        delay = 1.0
        while True:
            try:
                await src.connect()
            except Exception as e:
                log.error(
                    "trigger %s cannot connect: %s; retrying in %.0fs",
                    name,
                    e,
                    delay,
                    extra={"trigger": name},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            self._connected.add(name)
            if self._connected >= set(self.sources):
                self._mark_ready()
            return

    async def _pump(self, name: str, src: Source[Any]) -> None:
        tc = self.config.triggers[name]
        slots = self.dispatcher.slots
        received = self.metrics.events_received.labels(name, tc.type)
        inflight = self._inflight[name]
        assert self._tg is not None
        tg = self._tg
        await self._connect(name, src)
        while True:
            await slots.acquire()
            try:
                delivery = await src.read()
            except EndOfInput:
                slots.release()
                log.info("trigger %s has no more events", name, extra={"trigger": name})
                return
            except NotConnected:
                slots.release()
                self._connected.discard(name)
                await self._connect(name, src)
                continue
            except BackOff as b:
                slots.release()
                await asyncio.sleep(b.delay_s)
                continue
            except asyncio.CancelledError:
                slots.release()
                raise
            except Exception as e:
                slots.release()
                log.error(
                    "trigger %s failed to read: %s; reconnecting",
                    name,
                    e,
                    exc_info=True,
                    extra={"trigger": name},
                )
                await asyncio.sleep(1.0)
                continue
            received.inc()
            task = tg.create_task(self._handle(name, tc, delivery))
            inflight.add(task)
            task.add_done_callback(inflight.discard)

    async def _handle(self, name: str, tc: TriggerConfig, delivery: Delivery) -> None:
        try:
            await self.acceptor_for(name).accept(
                delivery, trigger=name, function=tc.function, fmt=tc.format
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # One bad event must never take the daemon down; it is logged with its trigger.
            log.error(
                "handling an event of trigger %s failed: %s",
                name,
                e,
                exc_info=True,
                extra={"trigger": name},
            )
            with contextlib.suppress(Exception):
                await delivery.nack(e)
        finally:
            self.dispatcher.slots.release()

    # --- status ------------------------------------------------------------------------------

    def _metric_state(self) -> dict[str, Any]:
        sources = {}
        for name, src in list(self.sources.items()):
            try:
                sources[name] = dict(src.status())
            except Exception:  # a status must never break a scrape
                sources[name] = {}
        return {
            "in_flight": {n: self.dispatcher.in_flight(n) for n in self.dispatcher.functions},
            "queue_depth": self.queue.depth if self.queue is not None else 0,
            "sources": sources,
        }

    async def status(self) -> dict[str, Any]:
        """What ``event-bridge status`` and ``GET /status`` show."""
        qs = await self.store.queue_stats()
        triggers = {}
        for name, tc in self.config.triggers.items():
            entry: dict[str, Any] = {
                "type": tc.type,
                "function": tc.function,
                "enabled": tc.enabled,
            }
            src = self.sources.get(name)
            if src is not None:
                entry["connected"] = name in self._connected
                with contextlib.suppress(Exception):
                    entry.update(src.status())
            triggers[name] = entry
        return {
            "version": __version__,
            "state": self.state.value,
            "ready": self.ready.is_set(),
            "uptime_s": round(time.monotonic() - self._t0, 3),
            "in_flight": self.dispatcher.in_flight(),
            "functions": {
                n: {
                    "runtime": fc.runtime,
                    "concurrency": fc.concurrency,
                    "in_flight": self.dispatcher.in_flight(n)
                    if n in self.dispatcher.functions
                    else 0,
                    "queued": qs["depth"].get(n, 0),
                    "dead_letters": qs["dead_letters"].get(n, 0),
                }
                for n, fc in self.config.functions.items()
            },
            "triggers": triggers,
            "queue": {
                "depth": sum(qs["depth"].values()),
                "next_due": qs["next_due"],
                "oldest_accepted": qs["oldest"],
            },
            "dead_letters": sum(qs["dead_letters"].values()),
        }
