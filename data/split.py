"""The sub-validation split: ``per_class`` training images of every class, held out for the search.

Drawn once with a fixed seed (independent of ``--seed``, so PruningNet training and every search
see the same split), saved as JSON in the folder the caller names (the scripts:
``checkpoints/meta_prune/splits/`` under their output folder) and reused.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Hashable, Sequence

from utils.files import save_text

from .errors import DataError

SPLIT_SEED = 0


def split_path(folder: Path, dataset: str, source: str, per_class: int) -> Path:
    """Where in ``folder`` the split of ``source`` (a data root, or a digest of the data) with
    ``per_class`` images is kept."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    return folder / f"{dataset}_{digest}_subval{per_class}.json"


def draw(keys: Sequence[Hashable], targets: Sequence[int], classes: Sequence[str], per_class: int) -> list:
    """Pick ``per_class`` keys of every class at random (fixed seed); every class keeps ≥ 1 for training."""
    by_class: dict[int, list] = defaultdict(list)
    for key, t in zip(keys, targets):
        by_class[t].append(key)
    rng = random.Random(SPLIT_SEED)
    picked = []
    for t, name in enumerate(classes):
        have = len(by_class[t])
        if have <= per_class:
            raise DataError(f"class '{name}' has {have} training images; the sub-validation split needs more than "
                            f"--val-per-class {per_class} (lower --val-per-class or add images)")
        picked += rng.sample(by_class[t], per_class)
    return picked


def load_or_draw(path: Path, keys: Sequence[Hashable], targets: Sequence[int], classes: Sequence[str],
                 per_class: int) -> tuple[set, str | None]:
    """The held-out keys, read from ``path`` when present (checked against the data), else drawn;
    and for a fresh draw the file text still to be written (``save``), else ``None``."""
    known = set(keys)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            held = [k if isinstance(k, int) else str(k) for k in saved["subval"]]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise DataError(f"sub-validation split {path} is unreadable; delete it to draw it again") from None
        missing = [k for k in held if k not in known]
        if missing or len(held) != per_class * len(classes):
            raise DataError(f"sub-validation split {path} does not match the data (e.g. {missing[:1]} is gone); "
                            f"delete it to draw a new split")
        return set(held), None
    held = draw(keys, targets, classes, per_class)
    text = json.dumps({"per_class": per_class, "seed": SPLIT_SEED, "classes": list(classes),
                       "subval": sorted(held, key=str)})
    return set(held), text


def save(path: Path, text: str) -> None:
    """Write a freshly drawn split (atomically, like every file the project writes)."""
    save_text(text, path)
