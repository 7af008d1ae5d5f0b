"""The one checkpoint helper: atomic writes, safe loads, and models rebuilt from the file alone.

Every file is written atomically (``utils.files.atomic_write``), so a crash at any moment leaves
the previous good file. Loading
uses ``torch.load(weights_only=True)``: checkpoints hold tensors and plain Python types only, so a
file carrying pickled code is refused instead of executed. A file damaged anywhere (a checksum of
the archive, its pickle, the fields its kind needs) is one ``UserError`` naming it.
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap as mmap_module
import os
import pickle
import shutil
import socket
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from models import create_model, get_family, is_pruningnet, list_models
from search.evolution import SearchState
from utils.cli import UserError
from utils.files import atomic_write

FORMAT = "metaprune"
MODEL, SEARCH = "model", "search"
# What the scripts read from each kind, with its type (a checkpoint without them is damaged).
FIELDS = {MODEL: {"arch": str, "model_args": dict, "model": dict},
          SEARCH: {"arch": str, "iter": int, "candidates": list, "state": dict, "budget": dict, "settings": dict}}
OPTIONAL_FIELDS = {MODEL: {"epoch": int, "step_in_epoch": int, "samples_in_epoch": int, "best_top1": (int, float),
                           "optimizer": dict, "scheduler": dict, "config": dict, "gene": (list, type(None)),
                           "run_id": str},
                   SEARCH: {"input_size": int, "model_args": dict, "config": dict}}
MODEL_ARGS = {"num_classes": int, "width_mult": (int, float), "small_input": bool}


_HOST = socket.gethostname()


def check_writable(*folders: Path) -> None:
    """Fail before any work when an output folder cannot be created or written."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(f"cannot write to {folder}/ ({e.strerror or e}); run from a writable directory") from None


def check_outputs(files: Sequence[Path], resumed: str | None, overwrite: bool, resume_flag: str) -> None:
    """Refuse a run whose output ``files`` (its resumable checkpoint first) already hold another run's work.

    Resuming that very checkpoint (``resumed``, given with ``resume_flag``) goes on with the run that
    owns them; ``--overwrite`` replaces them. Anything else stops with one line naming the way out.
    """
    own = files[0]
    if overwrite or (resumed and own.is_file() and Path(resumed).resolve() == own.resolve()):
        return
    for f in files:
        if f.exists():
            raise UserError(f"{f} exists: a run of this name wrote it; continue that run with {resume_flag} {own}, "
                            f"give this one another --suffix, or pass --overwrite to replace it")


@contextlib.contextmanager
def run_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold ``folder/.{name}.lock`` while the run writes: a second live run of the same name stops
    with one line instead of interleaving its files and logs. The lock is an ``flock``, which the
    system releases when the process ends, however it ends; the file itself stays."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"another run of {name} is writing its files ({holder}); wait for it to end or give "
                            f"this run another --suffix") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {_HOST}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically (``state`` must hold only tensors and plain types)."""
    atomic_write(Path(path), lambda f: torch.save(state, f))


def copy(src: str | Path, dst: str | Path) -> None:
    """Atomically copy a finished checkpoint (``_best`` is only ever a complete file)."""
    with open(src, "rb") as f:
        atomic_write(Path(dst), lambda out: shutil.copyfileobj(f, out))


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
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a checkpoint file (*.pth.tar)")
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{flag} {path}: an empty file, not a checkpoint")
    zipped = zipfile.is_zipfile(path)
    if zipped:
        damaged = _damaged_member(path)
        if damaged:
            raise UserError(f"{flag} {path}: damaged file ({damaged}); use an intact copy")
    try:
        # only the zip format maps; anything else goes the plain way to its error below
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # the safe unpickler names the class or function it refused
            raise UserError(f"{flag} {path}: not a PyTorch checkpoint file, or a corrupt one") from None
        raise UserError(f"{flag} {path}: refused to load, the file holds pickled objects other than tensors and plain "
                        f"values (possibly code); load only checkpoints you trust") from None
    except Exception as e:  # a damaged archive or pickle fails in many places and ways, all of them this
        raise UserError(f"{flag} {path}: truncated or corrupt file ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{flag} {path}: not a MetaPrune checkpoint")
    if kind is not None and state.get("kind") != kind:
        other = {MODEL: "a model checkpoint (pass it as --resume or --inherit)",
                 SEARCH: "a search checkpoint (pass it as --search-resume)"}.get(state.get("kind"), "something else")
        raise UserError(f"{flag} {path}: this is {other}, not a {kind} checkpoint")
    problem = _missing(state)
    if problem:
        raise UserError(f"{flag} {path}: damaged checkpoint ({problem})")
    return state


def _damaged_member(path: Path) -> str | None:
    """What in the zip archive at ``path`` fails its CRC-32 (or cannot be read), else None.

    One sequential read of the file through the page cache (about 2 GB/s of checksum): PyTorch's
    reader does not check these checksums, so without this a flipped bit in a weight would load.
    """
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive, \
                mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ) as data:
            view = memoryview(data)
            try:
                for info in archive.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        continue  # torch.save stores; anything else is for torch.load to judge
                    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
                    begin = info.header_offset + 30 + name_len + extra_len
                    if begin + info.compress_size > len(data) or \
                            zlib.crc32(view[begin:begin + info.compress_size]) != info.CRC:
                        return f"{info.filename} fails its checksum"
            finally:
                view.release()
    except (zipfile.BadZipFile, struct.error, OSError, ValueError) as e:
        return f"unreadable archive: {e}"
    return None


def _missing(state: dict[str, Any]) -> str | None:
    """The first field of ``state`` that its kind needs and that is absent or of the wrong type."""
    kind = state.get("kind")
    if kind not in FIELDS:
        return f"unknown kind {kind!r}"
    for name, types in (*FIELDS[kind].items(), *OPTIONAL_FIELDS[kind].items()):
        if name not in state:
            if name in OPTIONAL_FIELDS[kind]:
                continue
            return f"no field {name!r}"
        if not isinstance(state[name], types) or isinstance(state[name], bool) and types is int:
            return f"field {name!r} is {repr(state[name])[:40]}"
    if state["arch"] not in list_models():
        return f"unknown arch {state['arch']!r}"
    args = state.get("model_args", {})
    for name, types in MODEL_ARGS.items() if kind == MODEL or args else ():
        if not isinstance(args.get(name), types):
            return f"model_args {name!r} is {repr(args.get(name))[:40]}"
    if kind == MODEL and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        return "its weights are not all tensors"
    return _search_problem(state) if kind == SEARCH else None


def _search_problem(state: dict[str, Any]) -> str | None:
    """What in a search checkpoint's candidates, PruningNet record or evolution state does not read."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for i, c in enumerate(state["candidates"]):
        if not (isinstance(c, list) and c and all(map(number, c))):
            return f"candidate {i} is {repr(c)[:40]}"
    settings = state["settings"]
    trained, run = settings.get("pruningnet_trained"), settings.get("pruningnet_run")
    if trained is not None and not (isinstance(trained, list) and len(trained) == 2 and
                                    all(type(v) is int for v in trained)):
        return f"pruningnet_trained is {repr(trained)[:40]}"
    if run is not None and not isinstance(run, str):
        return f"pruningnet_run is {repr(run)[:40]}"
    try:
        SearchState.from_dict(state["state"])
    except ValueError as e:
        return str(e)
    return None


def identity(state: dict[str, Any]) -> dict[str, Any]:
    """What identifies a training checkpoint's weights: the run that trained them (``run_id``, set
    when a run starts from scratch and kept on resume) and how far it had gone (epoch, step)."""
    return {"run": state.get("run_id"), "trained": [int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0))]}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the underlying model (unwraps DistributedDataParallel)."""
    return getattr(model, "module", model).state_dict()


def model_record(arch: str, gene: tuple[int, ...] | None, num_classes: int, width_mult: float,
                 small_input: bool) -> dict[str, Any]:
    """What a checkpoint needs to rebuild its model (nanoGPT's ``model_args`` idea)."""
    return {"arch": arch, "gene": None if gene is None else list(gene),
            "model_args": {"num_classes": num_classes, "width_mult": width_mult, "small_input": small_input}}


def build_model(state: dict[str, Any], load_weights: bool = True) -> nn.Module:
    """Rebuild the model a checkpoint describes, with its weights (a ``UserError`` when they do not fit)."""
    arch, kwargs = state["arch"], dict(state["model_args"])
    try:
        if not is_pruningnet(arch) and state.get("gene") is not None:
            kwargs["gene"] = get_family(arch).layout.validate(state["gene"])
        model = create_model(arch, **kwargs)
        if load_weights:
            model.load_state_dict(state["model"])
    except (ValueError, RuntimeError, TypeError, KeyError, OverflowError) as e:
        what = " ".join(line.strip() for line in str(e).splitlines()[:2])  # load_state_dict's second line names it
        raise UserError(f"the checkpoint's {arch} does not rebuild from what it holds ({what[:200]})") from None
    return model
