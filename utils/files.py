"""Files written atomically: a temporary name in the target's folder, flushed, fsynced, then
``os.replace``d over the target, so a crash at any moment leaves the previous good file."""
from __future__ import annotations

import io
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

from .cli import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = socket.gethostname()


def _temp_owner_gone(tmp: Path) -> bool:
    """Whether the process that wrote temporary file ``tmp`` (``.NAME.HOST.PID.*.tmp``) is gone.

    Only temporary files of this host are judged: under torchrun several processes, possibly on
    other machines sharing the folder, may be writing at the same moment.
    """
    parts = tmp.name.rsplit(".", 4)
    if len(parts) != 5 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)``; temporary files that killed writers left are removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while writing
            if _temp_owner_gone(stale):
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # as an ordinary write would: mkstemp makes files private (0600)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; run from a writable directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous file is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_text(text: str, path: str | Path) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def read_text(path: Path, what: str, expected: str) -> str:
    """The text of a UTF-8 file; a path that is missing, a folder, unreadable or not UTF-8 is a
    UserError that starts with ``what`` and says what was ``expected``."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{what}: is a folder; expected {expected}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what}: not UTF-8 text (byte {e.start}); expected {expected}") from None
    except OSError as e:
        raise UserError(f"{what}: cannot read it ({e.strerror})") from None
