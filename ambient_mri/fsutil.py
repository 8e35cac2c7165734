"""Atomic file output and per-file claims, so that no half-written file ever looks finished."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

from .errors import AmbientMRIError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name starts with ``.`` and ends with ``.tmp`` so that globbing for finished outputs
    never sees it. On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise AmbientMRIError(f"cannot write here ({e.strerror or e})", path.parent) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise AmbientMRIError(f"cannot write output ({e.strerror})", path) from None
        raise
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p):
    with contextlib.suppress(OSError):
        os.unlink(p)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path, ".json.tmp") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def claim(path: str | os.PathLike):
    """Claim the right to produce ``path`` across processes (an ``O_EXCL`` lock file beside it).

    Yields True if this process holds the claim, False if another live process does. A claim left
    behind by a dead process (its pid no longer exists on this host) is taken over.
    """
    lock = Path(path).with_name(f".{Path(path).name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = False
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(lock):
                _unlink(lock)
                continue
            break
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        held = True
        break
    try:
        yield held
    finally:
        if held:
            _unlink(lock)


def _stale(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().split()[0])
    except OSError:
        return True
    except (ValueError, IndexError):  # being written right now, or garbage left long ago
        import time

        try:
            return time.time() - lock.stat().st_mtime > 30
        except OSError:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
