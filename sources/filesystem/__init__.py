"""The filesystem trigger: a local directory as an object-storage bucket (SCF's COS trigger).

The package, by concern: ``config`` (the trigger's table and file-name rules), ``paths``
(keys, containment, file versions), ``inotify`` (the local watcher, on the event loop),
``watcher`` (watchdog's polling observer, the directory scan), ``state`` (what was emitted, checkpointed through
:class:`bridge.checkpoint.ShardedState`), ``events`` (the COS events) and ``source`` (the
pending set, rescans, ``read_many`` and settling).

A file that is fully written under a watched directory becomes one COS
``cos:ObjectCreated:Put`` event; a file that goes away becomes one
``cos:ObjectRemove:Delete`` event. The object key is the path relative to the
watched root (``/``-separated), the bucket is ``bucket`` (default: the trigger
name), and ``cosObject.url`` is the file's ``file://`` URL.

How the pieces fit (the core's contract is in bridge/abc.py):

- **Watching.** One inotify instance, read on the event loop (``loop.add_reader``):
  each kernel event becomes a small tuple (a close-after-write or a rename into place
  with the file's version, read right there) without crossing a thread, and while the
  source is behind the fd is not read (the kernel queues). New directories are watched
  and listed as they appear (``recursive``). With ``poll_interval`` (network
  filesystems) watchdog's polling observer runs on its own threads instead and hands
  the same tuples over through :class:`bridge.blocking.Feed`. Directory scans and
  re-checks run on one :class:`bridge.blocking.Worker` thread. The source creates no
  threads of its own.
- **Fully written, never half-written.** inotify reports ``IN_CLOSE_WRITE``
  when a writer closes the file: that is the event. A rename into place (the
  ``write tmp; mv tmp name`` idiom) is complete too. A file that appears without
  being opened for writing (a hard link) or is only seen by a scan or by the
  polling observer is emitted once it has not changed for ``settle``; one that
  was seen opened waits for its close, however long the writer pauses.
- **Moves** are a removal of the old key and a creation of the new one (COS has
  no rename). A removal is emitted only for a key that was emitted as created.
- **Checkpoints.** What was emitted is remembered per file as ``(mtime_ns,
  size)``, which is also the ETag (``"<mtime_ns hex>-<size hex>"``, nginx-style:
  cheap, no file content is read). It is written to the state store **only in
  ack()**, sharded (1024 JSON documents per root under the namespace
  ``filesystem:<trigger>``; on a shared PostgreSQL store ``filesystem:<trigger>@<host>``,
  as each replica watches its own directories) and group-committed: concurrent acks share
  one store transaction. A file is emitted again only when its ``(mtime_ns, size)``
  differs from the last one emitted.
- **Start-up and lost events.** With ``scan_on_start`` (the default) the roots
  are scanned once the watches are in place, so files created, changed or
  deleted while the daemon was down produce their events, and nothing already
  emitted is emitted again. (On the very first start every existing file is
  new.) Without it, the files present at start are only remembered. The kernel's
  inotify queue can overflow in a burst (``IN_Q_OVERFLOW``): every directory is
  watched again and the source rescans at once, and rescans every
  ``rescan_interval`` anyway (in case an overflow went unnoticed).
- **Keys are data, never paths.** A key is only ever derived from a path found
  under the root; a path is emitted only if its real path (symlinks resolved)
  is inside the root's real path; keys read back from the state store must be
  plain relative paths (no ``..``, ``.``, empty or absolute parts) or are
  dropped. Nothing outside a root is ever stat'ed, read or written.
- **Batches.** ``read_many`` hands out every event that is ready (up to the room the
  core has), so a burst of files is queued in one transaction and its checkpoints written
  in one group commit.
- **nack()** (the event could not be accepted) re-checks the file after
  ``settle``: it is emitted again if it still differs from what was acked.
"""

from sources.filesystem.config import FilesystemConfig
from sources.filesystem.events import CREATED, REMOVED
from sources.filesystem.paths import etag, probe, safe_key
from sources.filesystem.source import FilesystemSource
from sources.filesystem.state import SHARDS

__all__ = [
    "CREATED",
    "REMOVED",
    "SHARDS",
    "FilesystemConfig",
    "FilesystemSource",
    "etag",
    "probe",
    "safe_key",
]
