"""Build-once helpers for files in the data cache directory.

Every torchrun rank calls the same builders at start-up (corpus, tokenizer, token
cache). Rather than electing one rank and adding a barrier (which would drag
``torch.distributed`` into the data layer), each artifact is built under an exclusive
``fcntl`` lock in the cache directory: the first process to take the lock builds it,
the others block, then find the finished file and only read it. Files are written to a
temporary name in the same directory and moved into place with ``os.replace``, so a
reader never sees a half-written file, even if the builder is killed mid-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if missing).

    The lock is released when the file descriptor is closed, which the kernel also does
    if the holder dies, so a crashed builder never leaves the cache locked forever.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and then move ``tmp_path`` onto ``path`` atomically.

    The temporary file lives in the same directory as ``path`` so ``os.replace`` is a
    rename within one file system (atomic on POSIX). Writers should open ``tmp_path``
    themselves (``numpy.save`` given a bare name would append ``.npy`` to it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; the cache is shared by readers
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, building it with ``build(tmp_path)`` if it does not exist yet.

    Double-checked: a cheap existence test first (the common, already-cached case takes
    no lock), then again under the lock, because another process may have finished the
    file while this one waited.
    """
    if path.exists():
        return path
    with file_lock(path.parent / f".{path.name}.lock"):
        if not path.exists():
            atomic_write(path, build)
    return path
