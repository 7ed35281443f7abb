"""The daemon: wires config, state store, function targets, dispatcher, queue and sources.

Usage::

    async with Daemon(config) as d:
        await d.run_until_stopped()

Entering opens the state store, starts the function targets (warm workers) and
the durable queue. ``run_until_stopped`` runs, in one task group, the queue's
runner, one pump per enabled trigger (one schedule pump for all the timers:
:mod:`bridge.schedule`), the HTTP API, the public gateway of HTTP
triggers (:mod:`bridge.gateway`, which has no pumps) and the systemd watchdog,
until :meth:`Daemon.request_stop` (SIGTERM/SIGINT).

- A pump (:mod:`bridge.pumps`) takes a global in-flight slot, reads one delivery
  and hands it to its acceptor (the durable queue, or the ordered invoker for
  Kafka-style sources) in a task that releases the slot when done. A source that
  fails to connect is retried with backoff while the other triggers keep running.
- SIGHUP reloads (:meth:`Daemon.reload`): a bad config is logged and the old
  one keeps running; a good one is built first (new targets started, sources
  and sinks built: if any of that fails, nothing has changed), then it stops
  removed triggers after their in-flight events settle, swaps changed functions
  (running invocations finish on the old code) and starts added triggers.
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
import gc
import logging
import os
import signal
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bridge import __version__, systemd, watch
from bridge import config as cfg
from bridge import log as logsetup
from bridge.abc import (
    DeadLetterContext,
    DeadLetterSink,
    Source,
    Target,
)
from bridge.config import Config
from bridge.control import ControlServer, Operations, StateLock
from bridge.deadletter import open_sink
from bridge.dispatcher import Acceptor, Dispatcher
from bridge.errors import ConfigError
from bridge.host import RunState
from bridge.logstore import LogStoreHandler, install_log_store, uninstall_log_store
from bridge.metrics import Metrics
from bridge.ordered import OrderedInvoker
from bridge.pumps import Pumps
from bridge.queue import DurableQueue
from bridge.retry import DEFAULT_ORDERED, OrderedConfig
from bridge.schedule import SchedulePump
from bridge.store import StateStore
from bridge.stores import store_for
from bridge.wiring import build_source, build_targets, is_http_trigger, log_skipped

if TYPE_CHECKING:
    from bridge.api import Api
    from bridge.gateway import Gateway

log = logging.getLogger("bridge.daemon")
#: the cyclic GC's young-generation threshold once the daemon runs (CPython's default: 700)
GC_YOUNG = 10_000


class Daemon(Pumps):
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
        self.store = store or store_for(config)
        #: one daemon per state directory (not taken for a store given by the caller)
        self.lock = StateLock(config.state_dir) if store is None else None
        self.control: ControlServer | None = None
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
        self.logs: LogStoreHandler | None = None  # the invocation log store, once open
        self.gateway: Gateway | None = None
        self._given_sources = sources
        self.sources: dict[str, Source[Any]] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._schedule: SchedulePump | None = None  # serves the timers, while running
        self._inflight: dict[str, set[asyncio.Task[None]]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._connected: set[str] = set()
        #: sources that had their first connect attempt, and the last connect error of each
        self._attempted: set[str] = set()
        self.last_error: dict[str, str] = {}
        self._watch = False
        #: digests of the function code folders the running targets were started from
        self._code = watch.digests(config)
        self._t0 = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self.ready = asyncio.Event()
        #: unix time of the last event read per trigger; queue stats as of the last scrape
        self.last_event: dict[str, float] = {}
        self._qstats: dict[str, Any] = {}
        self.metrics.add_state(self._metric_state)

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Daemon:
        self._t0 = time.monotonic()
        log_skipped(self.config)
        try:
            if self.lock is not None:
                self.lock.acquire()
                self._stack.callback(self.lock.release)
            await self.store.open()
            self._stack.push_async_callback(self.store.close)
            if self.config.logs.enabled:
                lc = self.config.logs
                self.logs = install_log_store(
                    self.config.state_dir, retention_s=lc.retention, max_bytes=lc.max_size
                )
                self._stack.callback(uninstall_log_store, self.logs)
            self._stack.push_async_callback(self.dispatcher.close)
            await self.dispatcher.start()
            await self._open_queue()
            if self.lock is not None:
                ops = Operations(self.config, self.store, self.queue, self)
                self.control = ControlServer(ops, self.config.state_dir)
                await self.control.start()
                self._stack.push_async_callback(self.control.close)
            if self._given_sources is not None:
                self.sources = dict(self._given_sources)
            else:
                for name, tc in self.config.triggers.items():
                    if tc.enabled and not is_http_trigger(tc):
                        self.sources[name] = build_source(
                            self.config, name, self.store, self.dispatcher.runs_together
                        )
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
        return retry if isinstance(retry, OrderedConfig) else DEFAULT_ORDERED

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
        if self.ordered is not None:  # (a daemon run again in-process)
            self.ordered.resume()
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
            self._schedule = SchedulePump(
                self.dispatcher.slots, self._scheduled_batch, self._no_more_events
            )
            scheduler = tg.create_task(self._schedule.run(), name="schedule")
            for name, src in self.sources.items():
                self._start_pump(name, src)
            if not self.sources:
                self._mark_ready()
            # Ready once every source had its first connect attempt, or after start_timeout:
            # one unreachable broker must not keep the working triggers from being served.
            start_timer = tg.create_task(self._start_timeout(), name="start-timeout")
            watcher = tg.create_task(self._watch_loop(), name="watch") if self._watch else None
            # What start-up built lives as long as the daemon: keep it out of the cyclic GC's
            # scans, whose full collections otherwise pause the loop for tens of milliseconds
            # when many triggers fire at once. And collect the young generation every
            # GC_YOUNG net allocations instead of 700: a thousand events due at once
            # allocate ~15,000 containers, nearly all freed by their reference counts, and
            # each young collection promoted the ones still in use towards a full one.
            gc.freeze()
            threshold = gc.get_threshold()
            gc.set_threshold(GC_YOUNG, *threshold[1:])
            try:
                await self._stop.wait()
            finally:  # a program that runs the daemon in-process gets its own back
                gc.set_threshold(*threshold)
            self.state = RunState.STOPPING
            # the gateway stops accepting and drains its requests alongside the triggers
            gateway = self.gateway
            gw_closed = tg.create_task(gateway.close()) if gateway is not None else None
            # 1. stop reading; 2. let what was read settle; 3. close sources (commit acks)
            scheduler.cancel()
            for p in self._pumps.values():
                p.cancel()
            if self.ordered is not None:  # what was handed out and not started goes back
                self.ordered.stop_starting()
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
            start_timer.cancel()
            if watcher is not None:
                watcher.cancel()
        self._tg = None

    async def _start_gateway(self) -> None:
        """The public HTTP listener, when the config has HTTP triggers (bridge.gateway)."""
        from bridge.gateway import Gateway, wanted

        if self.gateway is None and wanted(self.config):
            gateway = Gateway(self)
            await gateway.start()
            self.gateway = gateway

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
                    n = len(e.problems)
                    problems = f"{n} problem{'' if n == 1 else 's'}"
                    log.error("reload rejected (%s); still running the previous config", problems)
                    self.metrics.reloads.labels("rejected").inc()
                    systemd.notify(f"STATUS=reload rejected ({problems}); {self.summary()}")
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
                why = logsetup.redact(str(e))
                systemd.notify("READY=1", f"STATUS=reload failed: {why}; {self.summary()}")
                return False
            self.metrics.reloads.labels("applied").inc()
            systemd.notify("READY=1", f"STATUS={self.summary()}")
            return True

    async def _apply(self, new: Config) -> None:
        old = self.config
        log_skipped(new)
        grace = new.daemon.shutdown_grace
        for key in (
            "state_dir", "max_in_flight", "max_queued", "timezone",
            "database_url", "database_url_file", "replica", "takeover",
        ):  # fmt: skip
            if getattr(old.daemon, key) != getattr(new.daemon, key):
                log.warning("reload: daemon.%s changed; it takes effect after a restart", key)
        if old.api != new.api:
            log.warning("reload: [api] changed; it takes effect after a restart")
        # a function whose code folder changed is swapped too (hashing may read many files)
        code = await asyncio.to_thread(watch.digests, new)
        changed_fns = {
            n
            for n in old.functions.keys() & new.functions.keys()
            if old.functions[n] != new.functions[n] or self._code.get(n) != code.get(n)
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

        # 1. build and start everything new first: if any of it fails, nothing has changed
        # and the old config keeps running whole (a later reload diffs against it)
        new_targets = build_targets(new, sorted(added_fns | changed_fns))
        new_sinks = {n: self._sink(fc.async_.dead_letter) for n, fc in new.functions.items()}
        new_sources = {
            n: build_source(new, n, self.store, self.dispatcher.runs_together)
            for n in sorted(added_trigs)
            if new.triggers[n].enabled and not is_http_trigger(new.triggers[n])
        }
        started: list[Target[Any]] = []
        try:
            for name in sorted(new_targets):
                await new_targets[name].start()
                started.append(new_targets[name])
        except BaseException:
            for t in started:
                with contextlib.suppress(Exception):
                    await t.close()
            raise
        # 2. swap. Triggers that go away (or change) stop reading and settle what they read
        await asyncio.gather(
            *(self._stop_trigger(n, grace) for n in removed_trigs if n in self.sources)
        )
        # functions: new code takes new invocations; running ones finish on the old code
        for name in sorted(new_targets):
            await self.dispatcher.replace(name, new_targets[name], grace, started=True)
            log.info("reload: function %s %s", name, "updated" if name in changed_fns else "added")
        # HTTP routes: added ones now reach started functions, removed ones stop before
        # their functions go (requests in flight keep the route they matched)
        if self.gateway is not None:
            self.gateway.update(new)
        for name in sorted(removed_fns):
            await self.dispatcher.replace(name, None, grace)
            log.info("reload: function %s removed (its queued events wait for it)", name)
        # the queue and the dead-letter sinks follow the new config
        self.config = new
        self.sinks.clear()
        self.sinks.update(new_sinks)
        if self.queue is not None:
            await self.queue.reconfigure(new, self.sinks)
        if self.ordered is not None:
            self.ordered.reconfigure(self.sinks)
        # 3. triggers that are new (or changed) start
        for name, src in new_sources.items():
            self.sources[name] = src
            self._start_pump(name, src)
            log.info(
                "reload: trigger %s %s", name, "restarted" if name in changed_trigs else "added"
            )
        self._code = code
        if self.gateway is None and self._tg is not None:
            await self._start_gateway()
        log.info(
            "reload applied: %d functions, %d triggers",
            len(self.dispatcher.functions),
            self._running_triggers(),
        )

    async def refresh_code(self) -> None:
        """Swap the functions whose code folder changed, keeping the config (``dlq replay``
        calls it first, so replayed events run the code that is there now)."""
        if watch.changed(self._code, await asyncio.to_thread(watch.digests, self.config)):
            await self.reload(self.config)

    def watch(self) -> None:
        """``run --watch``: reload when the config files or a function's code change."""
        self._watch = True

    async def _watch_loop(self) -> None:
        files, seen = watch.files_signature(self.config), self._code
        while True:
            await asyncio.sleep(1.0)
            now_files = watch.files_signature(self.config)
            if now_files != files:
                log.info("watch: the config changed; reloading")
                await self.reload()
                files, seen = watch.files_signature(self.config), self._code
                continue
            code = await asyncio.to_thread(watch.digests, self.config)
            if code != seen:  # once per change, even when the reload fails
                seen = code
                if watch.changed(self._code, code):
                    log.info("watch: function code changed; reloading")
                    await self.reload(self.config)

    async def _stop_trigger(self, name: str, grace: float) -> None:
        pump = self._pumps.pop(name, None)
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if self.ordered is not None:
            self.ordered.stop_starting(name)
        inflight = self._inflight.pop(name, set())
        try:
            if inflight:
                _, pending = await asyncio.wait(inflight, timeout=grace)
                for t in pending:
                    t.cancel()
        finally:
            if self.ordered is not None:  # its next pump (a changed trigger) starts afresh
                self.ordered.resume(name)
        await self._close_source(name)
        self.sources.pop(name, None)
        self._connected.discard(name)
        self._attempted.discard(name)
        self.last_error.pop(name, None)
        log.info("reload: trigger %s stopped", name)

    # --- status ------------------------------------------------------------------------------

    def _metric_state(self) -> dict[str, Any]:
        sources = {}
        for name, src in list(self.sources.items()):
            try:
                sources[name] = dict(src.status())
            except Exception:  # a status must never break a scrape
                sources[name] = {}
        oldest = self._qstats.get("oldest")
        return {
            "in_flight": {n: self.dispatcher.in_flight(n) for n in self.dispatcher.functions},
            "queue_depth": self.queue.depth if self.queue is not None else 0,
            "sources": sources,
            "connected": {n: n in self._connected for n in self.sources},
            "oldest_queued_age_s": max(0.0, time.time() - oldest) if oldest else None,
            "dead_letters_stored": self._qstats.get("dead_letters", {}),
        }

    async def refresh_stats(self) -> None:
        """Read the queue and dead-letter counts the scrape-time gauges show (the API calls
        it before rendering /metrics: the store is asynchronous, collectors are not)."""
        with contextlib.suppress(NotImplementedError):
            self._qstats = await self.store.queue_stats()

    async def status(self) -> dict[str, Any]:
        """What ``event-bridge status`` and ``GET /status`` show."""
        qs = await self.store.queue_stats()
        gateway = self.gateway
        served = {r.trigger: r for r in gateway.table.routes} if gateway is not None else {}
        triggers = {}
        for name, tc in self.config.triggers.items():
            entry: dict[str, Any] = {
                "type": tc.type,
                "function": tc.function,
                "enabled": tc.enabled,
            }
            src = self.sources.get(name)
            route = served.get(name)
            if route is not None:  # an HTTP trigger: the gateway serves it (no source)
                entry["connected"] = True
                entry["route"] = " ".join(
                    (",".join(sorted(route.methods)) if route.methods else "ANY", route.template)
                )
            elif src is not None:
                entry["connected"] = name in self._connected
                if name in self.last_error:
                    entry["last_error"] = self.last_error[name]
                with contextlib.suppress(Exception):
                    entry.update(src.status())
            triggers[name] = entry
        for key, why in self.config.skipped.items():
            kind, _, name = key.partition(".")
            if kind == "triggers":  # its plugin fails to load, or its function is not run
                kind, function, enabled = self.config.skipped_triggers.get(name, ("?", "?", True))
                triggers[name] = {
                    "type": kind,
                    "function": function,
                    "enabled": enabled,
                    "connected": False,
                    "not_run": why,
                }
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
            # scale-out (bridge/pgstore.py): the replicas sharing the database
            **(
                {"replicas": await self.store.replicas()} if hasattr(self.store, "replicas") else {}
            ),
        }
