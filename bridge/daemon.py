"""The daemon: wires config, state store, function targets, dispatcher and trigger sources.

Usage::

    async with Daemon(config) as d:
        await d.run_until_stopped()

Entering starts the state store and the function targets (warm workers);
``run_until_stopped`` runs one pump task per enabled trigger inside a single
task group, until :meth:`Daemon.request_stop` (SIGTERM/SIGINT). A pump takes a
global in-flight slot, reads one delivery, and hands it to the acceptor in a
task of the same group that releases the slot when done. A source that fails to
connect is retried with backoff while the other triggers keep running.
Stopping closes the sources first (no new events), waits up to
``daemon.shutdown_grace`` for in-flight events, then closes the targets and the
store (each cleanup registered on an AsyncExitStack, so all run even if one
fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from zoneinfo import ZoneInfo

from bridge import registry, systemd
from bridge.abc import (
    BackOff,
    DeadLetterContext,
    DeadLetterSink,
    Delivery,
    EndOfInput,
    NotConnected,
    Source,
    SourceContext,
    Target,
    TargetContext,
)
from bridge.config import Config, TriggerConfig
from bridge.deadletter import open_sink
from bridge.dispatcher import Acceptor, DirectAcceptor, Dispatcher
from bridge.ordered import OrderedInvoker
from bridge.queue import DurableQueue
from bridge.retry import OrderedConfig
from bridge.store import SqliteStore, StateStore

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
        self.store = store or SqliteStore(config.state_dir)
        self.dispatcher = Dispatcher(
            targets if targets is not None else build_targets(config),
            max_in_flight=config.daemon.max_in_flight,
        )
        self.sinks: dict[str, DeadLetterSink] = {}
        self.queue: DurableQueue | None = None
        self.ordered: OrderedInvoker | None = None
        self.acceptor: Acceptor = DirectAcceptor(self.dispatcher)
        self._given_sources = sources
        self.sources: dict[str, Source[Any]] = {}
        self._stop = asyncio.Event()
        self._connected: set[str] = set()
        self._t0 = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self.ready = asyncio.Event()

    async def __aenter__(self) -> Daemon:
        self._t0 = time.monotonic()
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
                    if tc.enabled:
                        self.sources[name] = build_source(self.config, name, self.store)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _open_queue(self) -> None:
        dctx = DeadLetterContext(store=self.store, logger=logging.getLogger("bridge.deadletter"))
        opened: dict[str, DeadLetterSink] = {}
        for name, fc in self.config.functions.items():
            spec = fc.async_.dead_letter
            if spec not in opened:
                opened[spec] = open_sink(spec, dctx)
                self._stack.push_async_callback(opened[spec].close)
            self.sinks[name] = opened[spec]
        self.queue = DurableQueue(self.config, self.store, self.dispatcher, self.sinks)
        await self.queue.start()
        self.acceptor = self.queue
        self.ordered = OrderedInvoker(self.dispatcher, self.store, self.sinks, self._ordered_policy)

    def _ordered_policy(self, trigger: str) -> OrderedConfig:
        retry = getattr(self.config.triggers.get(trigger), "retry", None)
        return retry if isinstance(retry, OrderedConfig) else OrderedConfig()

    def acceptor_for(self, trigger: str) -> Acceptor:
        """Ordered sources are invoked in place; every other delivery goes to the queue."""
        src = self.sources.get(trigger)
        if src is not None and type(src).ordered and self.ordered is not None:
            return self.ordered
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

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("second %s: exiting now", sig.name)
            raise SystemExit(1)
        log.info("received %s", sig.name)
        self.request_stop()

    async def run_until_stopped(self) -> None:
        self.state = RunState.RUNNING
        if not self.sources:
            self._mark_ready()
        inflight: set[asyncio.Task[None]] = set()
        async with asyncio.TaskGroup() as tg:
            if self.queue is not None:
                tg.create_task(self.queue.run(self._stop), name="queue")
            pumps = [
                tg.create_task(self._pump(name, src, tg, inflight), name=f"pump:{name}")
                for name, src in self.sources.items()
            ]
            await self._stop.wait()
            self.state = RunState.STOPPING
            for p in pumps:
                p.cancel()
            await self._close_sources()
            if inflight:
                _, pending = await asyncio.wait(inflight, timeout=self.config.daemon.shutdown_grace)
                if pending:
                    log.warning(
                        "%d invocations still running after the %.0fs grace period; cancelling",
                        len(pending),
                        self.config.daemon.shutdown_grace,
                    )
                    for t in pending:
                        t.cancel()

    def _mark_ready(self) -> None:
        if not self.ready.is_set():
            ms = (time.monotonic() - self._t0) * 1000
            log.info(
                "ready: %d functions, %d triggers running (started in %.0f ms)",
                len(self.dispatcher.functions),
                len(self.sources),
                ms,
            )
            n_fn, n_trig = len(self.dispatcher.functions), len(self.sources)
            systemd.notify("READY=1", f"STATUS=running: {n_fn} functions, {n_trig} triggers")
            self.ready.set()

    async def _close_sources(self) -> None:
        for name, src in list(self.sources.items()):
            try:
                await src.close()
            except Exception as e:
                log.error(
                    "closing trigger %s failed: %s", name, e, exc_info=True, extra={"trigger": name}
                )

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

    async def _pump(
        self, name: str, src: Source[Any], tg: asyncio.TaskGroup, inflight: set[asyncio.Task[None]]
    ) -> None:
        tc = self.config.triggers[name]
        slots = self.dispatcher.slots
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
