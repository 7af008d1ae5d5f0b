"""The one checkpoint helper: atomic writes, safe loads, and models rebuilt from the file alone.

Every file is written to a temporary name in the target directory, flushed, fsynced and then
``os.replace``d over the target, so a crash at any moment leaves the previous good file. Loading
uses ``torch.load(weights_only=True)``: checkpoints hold tensors and plain Python types only, so a
file carrying pickled code is refused instead of executed.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from models import create_model, get_family, is_pruningnet

from .config import UserError

FORMAT = "metaprune"
MODEL, SEARCH = "model", "search"


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


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
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


def check_writable(*folders: Path) -> None:
    """Fail before any work when an output folder cannot be created or written."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(f"cannot write to {folder}/ ({e.strerror or e}); run from a writable directory") from None


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically (``state`` must hold only tensors and plain types)."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def save_text(text: str, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def copy(src: str | Path, dst: str | Path) -> None:
    """Atomically copy a finished checkpoint (``_best`` is only ever a complete file)."""
    with open(src, "rb") as f:
        _atomic_write(Path(dst), lambda out: shutil.copyfileobj(f, out))


def load(path: str | Path, kind: str | None = None, flag: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """Load a MetaPrune checkpoint safely; user-facing problems become one-line ``UserError``s.

    ``kind`` (``"model"`` or ``"search"``) is checked so that a search checkpoint given where a
    model checkpoint belongs (or the reverse) is named as such. ``mmap=True`` maps the file instead
    of reading it: a multi-GB PruningNet is paged in as its tensors are copied into a model, and the
    processes of a node share the page cache. Its tensors read the file itself, so drop them once
    copied: rewriting the file in place while they live would crash the reader (this project's own
    writes replace files atomically, which is safe).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        # only the zip format maps; anything else goes the plain way to its error below
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # the safe unpickler names the class or function it refused
            raise UserError(f"{flag} {path}: not a PyTorch checkpoint file, or a corrupt one") from None
        raise UserError(f"{flag} {path}: refused to load, the file holds pickled objects other than tensors and plain "
                        f"values (possibly code); load only checkpoints you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: truncated or corrupt file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{flag} {path}: not a MetaPrune checkpoint")
    if kind is not None and state.get("kind") != kind:
        other = {MODEL: "a model checkpoint (pass it as --resume or --inherit)",
                 SEARCH: "a search checkpoint (pass it as --search-resume)"}.get(state.get("kind"), "something else")
        raise UserError(f"{flag} {path}: this is {other}, not a {kind} checkpoint")
    return state


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the underlying model (unwraps DistributedDataParallel)."""
    return getattr(model, "module", model).state_dict()


def model_record(arch: str, gene: tuple[int, ...] | None, num_classes: int, width_mult: float,
                 small_input: bool) -> dict[str, Any]:
    """What a checkpoint needs to rebuild its model (nanoGPT's ``model_args`` idea)."""
    return {"arch": arch, "gene": None if gene is None else list(gene),
            "model_args": {"num_classes": num_classes, "width_mult": width_mult, "small_input": small_input}}


def build_model(state: dict[str, Any], load_weights: bool = True) -> nn.Module:
    """Rebuild the model a checkpoint describes, with its weights."""
    arch, kwargs = state["arch"], dict(state["model_args"])
    if not is_pruningnet(arch) and state.get("gene") is not None:
        kwargs["gene"] = get_family(arch).layout.validate(state["gene"])
    model = create_model(arch, **kwargs)
    if load_weights:
        model.load_state_dict(state["model"])
    return model
