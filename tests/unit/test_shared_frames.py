"""The shared memory region the ``python`` runtime writes large frames into
(:class:`bridge.targets._pyworker.SharedFrames`) and the worker's side of it."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator

import pytest

from bridge.targets import _pyworker, _worker
from bridge.targets._pyworker import SHARED_KEEP, SharedFrames

MiB = 1 << 20


@pytest.fixture
def region() -> Iterator[SharedFrames]:
    shared = SharedFrames(8 * MiB)
    yield shared
    shared.close()


def resident(shared: SharedFrames) -> int:
    """The bytes the region's file holds in memory."""
    return os.fstat(shared.fd).st_blocks * 512


def test_a_frame_lies_at_the_start_and_the_socket_gets_where(region: SharedFrames) -> None:
    pieces = [b'[["id",1.5,3000,', b"x" * 100_000, b"]]"]
    size = sum(map(len, pieces))
    frame = region.frame(b"b", pieces, size)
    # the M frame: its length (6), M, the kind, the size
    assert frame == (6).to_bytes(4, "big") + b"Mb" + size.to_bytes(4, "big")
    assert region.map[:size] == b"".join(pieces)


def test_the_region_is_sealed_against_shrinking_growing_and_more_seals(
    region: SharedFrames,
) -> None:
    # what a process that opens it for writing (as root can, through /proc) could do: each
    # would let it fault the parent's writes
    rw = os.open(f"/proc/self/fd/{region.fd}", os.O_RDWR)
    try:
        for size in (0, 4 * MiB, 16 * MiB):
            with pytest.raises(PermissionError):
                os.ftruncate(rw, size)
        with pytest.raises(PermissionError):
            fcntl.fcntl(rw, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        os.close(rw)
    assert os.fstat(region.fd).st_size == 8 * MiB
    region.frame(b"i", [b"y" * MiB], MiB)  # and the parent still writes
    assert region.map[MiB - 1 : MiB] == b"y"


def test_the_workers_fd_gives_no_mapping_that_writes(region: SharedFrames) -> None:
    # Given the fd the worker inherits
    fd = region.fd
    # Then a shared mapping of it that writes is refused, and so is making a read-only one
    # writable (mprotect: what a handler could call through ctypes)
    with pytest.raises(PermissionError):
        mmap.mmap(fd, region.size)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = libc.mmap(None, region.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        rc = libc.mprotect(addr, region.size, mmap.PROT_READ | mmap.PROT_WRITE)
        assert (rc, ctypes.get_errno()) == (-1, errno.EACCES)
    finally:
        libc.munmap(addr, region.size)


def test_pages_beyond_what_is_kept_are_given_back_after_a_large_frame(
    region: SharedFrames,
) -> None:
    # Given a frame of 6 MiB written
    region.frame(b"i", [b"z" * (6 * MiB)], 6 * MiB)
    assert resident(region) >= 6 * MiB
    # When it is answered (trim)
    region.trim()
    # Then what lies beyond SHARED_KEEP is gone, what lies before is kept
    assert resident(region) == SHARED_KEEP
    assert region.map[:SHARED_KEEP] == b"z" * SHARED_KEEP
    # and a frame within what is kept gives nothing back
    region.frame(b"i", [b"k" * MiB], MiB)
    region.trim()
    assert resident(region) == SHARED_KEEP


def test_without_memfd_there_is_no_region(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", refuse)
    assert SharedFrames.create() is None


def test_the_worker_maps_the_region_read_only_and_closes_its_fd(
    region: SharedFrames,
) -> None:
    fd = os.dup(region.fd)  # what the worker inherits
    mapped = _worker._map_shared([fd, region.size])
    assert mapped is not None
    with pytest.raises(OSError):  # its fd is closed
        os.fstat(fd)
    region.frame(b"i", [b"seen"], 4)
    assert mapped[:4] == b"seen"
    with pytest.raises(TypeError):  # read-only
        mapped[:4] = b"over"
    mapped.close()


def test_a_worker_that_cannot_map_the_region_goes_without() -> None:
    assert _worker._map_shared(None) is None
    r, w = os.pipe()  # not mappable
    assert _worker._map_shared([r, 4096]) is None
    os.close(w)
    with pytest.raises(OSError):
        os.fstat(r)  # closed all the same


def test_the_region_is_sized_as_configured() -> None:
    shared = SharedFrames.create()
    assert shared is not None
    try:
        assert shared.size == len(shared.map) == _pyworker.SHARED_BYTES
    finally:
        shared.close()
