"""Atomic file output and per-file claims, so that no half-written file ever looks finished; file digests."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from .errors import AmbientMRIError

# errno values that mean "this output cannot be written" (full disk or quota, file size limit, read-only or
# forbidden folder, a path through a regular file), as opposed to a bug
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR,
                 errno.EEXIST, errno.EISDIR)


class OutputError(AmbientMRIError):
    """An output cannot be written (disk full, file size limit, unwritable folder): one line, naming the path.
    Fatal for a whole run (every later output would fail the same way); earlier outputs are left as they were."""


def _output_error(e: OSError, path, what: str = "cannot write output") -> OutputError:
    return OutputError(f"{what} ({e.strerror or type(e).__name__})", path)


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p path`` and prove that files can be created in it (a hidden probe file, created and removed),
    or a one-line :class:`OutputError` (a regular file in the way, a read-only folder...). Every command calls
    it on its output folder before any work, so an unwritable output never costs a run."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(e, path, "cannot create the output folder") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=path)
    except OSError as e:
        raise _output_error(e, path, "cannot write into the output folder") from None
    os.close(fd)
    _unlink(probe)
    return path


def umask() -> int:
    """The process's file-creation mask (``/proc/self/status`` on Linux: reading it changes nothing; elsewhere
    ``os.umask`` set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name starts with ``.`` and ends with ``.tmp`` so that globbing for finished outputs
    never sees it. The file gets the mode a plain ``open(path, "w")`` would give it, ``0o666 & ~umask``
    (``mkstemp`` alone makes it ``0o600``). On any exception the temporary file is removed and ``path`` is
    left as it was; a full disk, a file size limit or an unwritable folder becomes a one-line :class:`OutputError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(e, path.parent, "cannot write here") from None
    try:
        try:
            os.fchmod(fd, 0o666 & ~umask())
        finally:
            os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        if e.errno in OUTPUT_ERRNOS:
            raise _output_error(e, path) from None
        raise
    except BaseException:
        _unlink(tmp)
        raise


class WriteGuard(io.RawIOBase):
    """A binary file for libraries that write through a Python file object (HDF5's ``fileobj`` driver,
    ``torch.save``): the first ``OSError`` of a write (disk full, file size limit) is kept and every later
    write is dropped while reporting success, so that the library finishes and closes cleanly (HDF5 that
    sees a failed write leaves its file open and can crash the interpreter at exit). :meth:`check` raises
    the kept error; the file's content is then garbage and must be thrown away (:func:`atomic_path` does).
    """

    def __init__(self, raw):
        self.raw, self.error, self._pos = raw, None, 0

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def _do(self, fn, *args, default=None):
        if self.error is None:
            try:
                return fn(*args)
            except OSError as e:
                self.error = e
        return default

    def seek(self, offset, whence=os.SEEK_SET):
        if self.error is None:
            self._pos = self._do(self.raw.seek, offset, whence, default=self._pos)
        elif whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, b):
        n = self._do(self.raw.readinto, b, default=0)
        self._pos += n or 0
        return n

    def write(self, b):
        view = memoryview(b).cast("B")
        done = 0
        while self.error is None and done < len(view):
            n = self._do(self.raw.write, view[done:], default=0)
            if not n:
                break
            done += n
        self._pos += len(view)
        return len(view)

    def truncate(self, size=None):
        self._do(self.raw.truncate, size)
        return self._pos if size is None else size

    def flush(self):
        self._do(self.raw.flush)

    def fsync(self):
        self._do(os.fsync, self.raw.fileno())

    def check(self):
        """Raise the first write error, if any."""
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike, **kwargs):
    """Write an HDF5 file atomically: yield an ``h5py.File`` open for writing on a temporary file that is
    renamed onto ``path`` when the block succeeds. Writes go through a :class:`WriteGuard`, so a full disk
    or a file size limit ends as a one-line :class:`OutputError` (never as an HDF5 error cascade)."""
    with atomic_path(path, ".h5.tmp") as tmp:
        with open(tmp, "r+b", buffering=0) as raw:
            guard = WriteGuard(raw)
            f = h5py.File(guard, "w", **kwargs)
            f.guard = guard  # for callers that want to stop early: f.guard.check()
            try:
                yield f
            finally:
                f.close()
            guard.fsync()
        guard.check()


def _unlink(p):
    with contextlib.suppress(OSError):
        os.unlink(p)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of the file at ``path``, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path, ".json.tmp") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_HELD: set[str] = set()  # lock files this process holds right now


@contextlib.contextmanager
def claim(path: str | os.PathLike):
    """Claim the right to produce ``path`` across processes (an ``O_EXCL`` lock file beside it).

    Yields True if this process holds the claim, False if another live process does. A claim left
    behind by a dead process (its pid no longer exists on this host, or now belongs to a process that
    started later) is taken over, and the temporary files that process left for ``path`` are removed.
    Liveness is judged on this host: across machines sharing a file system, split the work with
    ``--shard`` rather than relying on claims.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    make_dir(lock.parent)
    held = False
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(lock):
                _unlink(lock)
                continue
            break
        except OSError as e:
            raise _output_error(e, lock, "cannot create a claim file") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
        held = True
        _HELD.add(os.fspath(lock))
        break
    try:
        if held:  # only the claim holder writes path: temporaries of it are a dead writer's leftovers
            for t in path.parent.glob(f".{glob.escape(path.name)}.*tmp"):
                _unlink(t)
        yield held
    finally:
        if held:
            _HELD.discard(os.fspath(lock))
            _unlink(lock)


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or ``""`` where unknown; with
    the pid it identifies a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _stale(lock: Path) -> bool:
    try:
        fields = lock.read_text().split()
        pid = int(fields[0])
    except OSError:
        return True
    except (ValueError, IndexError):  # being written right now, or garbage left long ago
        try:
            return time.time() - lock.stat().st_mtime > 30
        except OSError:
            return True
    if pid == os.getpid():  # our own pid, yet not a claim we hold: left by an earlier process with this pid
        return os.fspath(lock) not in _HELD
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    start = fields[1] if len(fields) > 1 else ""
    now = _start_time(pid)
    return bool(start and now and start != now)  # the pid now names a process that started later
