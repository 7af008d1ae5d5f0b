"""The gene: one scale id per layer group, and the scale grid it indexes.

A gene id ``i`` in ``0..30`` keeps ``int(base * SCALES[i])`` channels of a layer group whose full
width is ``base``; ``-1`` is accepted as an alias of ``30`` (ratio 1.0). This module is the only
place that knows the grid, the id range and how genes are written by users.
"""
from __future__ import annotations

import ast
import math
import random
from dataclasses import dataclass
from typing import Sequence

NUM_SCALES = 31
SCALES: tuple[float, ...] = tuple((10 + 3 * i) / 100 for i in range(NUM_SCALES))
FULL_ID = NUM_SCALES - 1
MIN_ID = -1

Gene = tuple[int, ...]


def channels(base: int, gene_id: int) -> int:
    """Channels a layer group of full width ``base`` keeps at ``gene_id``.

    The float product is truncated exactly as the seed and the official code do (the reference
    MAC counts depend on it); at least one channel survives tiny width multipliers.
    """
    return max(1, int(base * SCALES[gene_id]))


@dataclass(frozen=True)
class OfficialForm:
    """How the official MetaPruning code writes a gene of a family, on the same id grid.

    ``sources[p]`` are the official positions that hold position ``p``'s id (one, or several that
    the official code keeps equal, such as the blocks of one MobileNetV2 stage), or ``None`` for a
    position the official encoding leaves out because it is always full width.
    """

    length: int
    sources: tuple[tuple[int, ...] | None, ...]

    def convert(self, ids: Sequence[object], names: Sequence[str]) -> list[object]:
        """This layout's ids from an official gene; tied official positions must agree."""
        out: list[object] = []
        for name, src in zip(names, self.sources):
            if src is None:
                out.append(FULL_ID)
                continue
            values = [ids[j] for j in src]
            if any(v != values[0] for v in values):
                raise ValueError(f"official gene positions {', '.join(map(str, src))} ({name}) hold "
                                 f"{', '.join(map(str, values))}: they are one stage, which has one width here and "
                                 f"in the official PruningNet (its residual adds need it)")
            out.append(values[0])
        return out


@dataclass(frozen=True)
class GeneLayout:
    """What a gene means for one architecture family.

    ``names`` labels every position; ``fixed`` positions must stay full width (their output feeds
    a classifier of fixed input size). ``official`` is how the official MetaPruning code writes
    the same gene (ResNet50's 20 ids without ``stage4``; MobileNetV2's 35 per-layer ids).
    """

    family: str
    names: tuple[str, ...]
    fixed: tuple[int, ...]
    official: OfficialForm | None = None

    def __len__(self) -> int:
        return len(self.names)

    def parse(self, value: str | Sequence[object]) -> Gene:
        """Parse and validate a gene written as a list or as a ``"[20, 10, ...]"`` string.

        Accepted: the full form, the full form plus a trailing top-1 error element (as the
        search writes it), and the official form (with or without its error element).
        Returns canonical ids in ``0..30`` (``-1`` becomes ``30``).
        """
        items = _as_list(value)
        n, official = len(self.names), self.official.length if self.official else None
        if official is not None and len(items) == official + 1 and (len(items) != n or isinstance(items[-1], float)):
            items = items[:-1]  # an official gene and its error (a float last element tells it from n ids)
        elif len(items) == n + 1:
            err = items.pop()
            if isinstance(err, bool) or not isinstance(err, (int, float)) or not math.isfinite(err):
                raise ValueError(f"the last gene element is read as a top-1 error and must be a number, got {err!r}")
        if official is not None and len(items) == official and official != n:
            items = self.official.convert(items, self.names)
        if len(items) != n:
            forms = f"{n} ids (optionally followed by its top-1 error)"
            if official is not None:
                forms += f", or the official MetaPruning code's {official} ids"
            raise ValueError(f"a {self.family} gene has {forms}; got {len(items)} elements: {items}")
        return self.validate(items)

    def validate(self, ids: Sequence[object]) -> Gene:
        """Check length, type and range of every id; return canonical ids (``-1`` → ``30``)."""
        if len(ids) != len(self.names):
            raise ValueError(f"a {self.family} gene has {len(self.names)} ids, got {len(ids)}")
        out = []
        for pos, (name, v) in enumerate(zip(self.names, ids)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"gene position {pos} ({name}) must be an integer id, got {v!r}")
            if not MIN_ID <= v <= FULL_ID:
                raise ValueError(f"gene position {pos} ({name}) must be an id in -1..30, got {v}")
            v = FULL_ID if v == -1 else v
            if pos in self.fixed and v != FULL_ID:
                raise ValueError(
                    f"gene position {pos} ({name}) must be -1 or 30 (its output feeds the fixed-size "
                    f"classifier), got {ids[pos]}")
            out.append(v)
        return tuple(out)

    def full(self) -> Gene:
        """The unpruned gene (every position full width)."""
        return (FULL_ID,) * len(self.names)

    def sample(self, rng: random.Random, low: int = 0, high: int = FULL_ID) -> Gene:
        """A uniform random gene: every free position any id in ``low..high`` (default all of 0..30),
        fixed positions full width."""
        return tuple(FULL_ID if i in self.fixed else rng.randrange(low, high + 1) for i in range(len(self.names)))

    def narrowest(self) -> Gene:
        """The cheapest gene: every free position at id 0, fixed positions full width."""
        return tuple(FULL_ID if i in self.fixed else 0 for i in range(len(self.names)))

    def free_positions(self) -> tuple[int, ...]:
        """Positions a search or sampler may change."""
        return tuple(i for i in range(len(self.names)) if i not in self.fixed)

    def format(self, gene: Gene, error: float | None = None) -> list[float | int]:
        """The README form: fixed positions written as -1, optionally the top-1 error appended."""
        out: list[float | int] = [-1 if i in self.fixed else g for i, g in enumerate(gene)]
        if error is not None:
            out.append(round(float(error), 4))
        return out


def _as_list(value: str | Sequence[object]) -> list[object]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(
                f"cannot read a gene from {value!r}; write it as a list such as \"[20, 10, -1]\"") from None
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"a gene is a list of ids, got {value!r}")
