"""A private PostgreSQL server and a TCP proxy, for fault tests that must not disturb the
shared server on 5432 (restarting it, cutting its network).

:class:`PrivateServer` runs ``initdb``/``pg_ctl`` of the Debian package as the ``postgres``
user in a temporary directory, on a free port. :class:`Proxy` forwards a local port to a
server and can *cut* the path: it stops moving bytes both ways (what a pulled cable looks
like: nothing is refused or reset) until :meth:`Proxy.restore`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    root = Path("/usr/lib/postgresql")
    version = sorted(os.listdir(root), key=lambda v: int(v.split(".")[0]))[-1]
    return str(root / version / "bin" / name)


class PrivateServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="eb-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", _bin(tool), *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._pg(
            "pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"
        )

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, db: str = "postgres", port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{db}"

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """127.0.0.1:port → target, on a thread of its own."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pg-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._flow.clear)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(self._flow.set)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._flow = asyncio.Event()
        self._flow.set()
        self._stop = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    await self._flow.wait()  # cut: hold the bytes, move nothing
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    w.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            await self._flow.wait()
            try:
                sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
            except OSError:
                cw.close()
                return
            for t in (pipe(cr, sw), pipe(sr, cw)):
                task = asyncio.create_task(t)
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        server = await asyncio.start_server(handle, "127.0.0.1", self.port)
        self._ready.set()
        await self._stop.wait()
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
