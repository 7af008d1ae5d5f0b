"""Latency lookup table: per-layer latencies measured on this device, summed and calibrated.

MetaPruning's paper budgets latency with a table of per-layer latencies; no implementation was
released. Here the table holds:

- every distinct conv (kernel, stride, depthwise, input size, activation, base widths), timed as
  conv → BN → activation in eval mode on a grid of channel counts (the gene ids of ``GRID`` for
  its input and output slot); a gene's channels are bilinearly interpolated between grid points;
- every block's tail (residual add, the activation after it, the stem's max-pool), timed on the
  same grid of its output channels;
- pooling + classifier, timed once (no gene changes them).

Their sum, the *raw* estimate, leaves out what only shows in a whole network (most likely: a layer
timed alone, again and again, keeps its weights and input in cache, which inside a network it
mostly cannot; and the module calls in between take time). On a CPU, whole networks took 1.3-1.9x
their raw sum, a ratio that changes with the width. So the table also times whole PrunedNets of
the uniform-width genes (every free position at one id of ``GRID``, the narrowest gene to the
full one) and maps a raw sum to a latency by interpolating those measurements: piecewise linear
in the raw sum, and proportional beyond the first and last. ``benchmarks/latency_lut.py``
reports how close the result comes to end-to-end measurements of random genes.

Every timing is the fastest of ``repeats`` runs: other work on the machine only ever adds time.
"""
from __future__ import annotations

import bisect
import json
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models import ArchSpec, Gene, PrunedNet
from models.gene import FULL_ID, channels
from models.pruningnet import ACTIVATIONS, IMAGE_CHANNELS, IMAGE_SLOT, BlockSpec, ConvBN, ConvSpec, walk
from utils.files import save_text

GRID = (0, 5, 10, 15, 20, 25, 30)
VERSION = 2  # tables of another layout are refused, not misread
NUMBER = (int, float)
FIELD_TYPES = {"arch": str, "input_size": int, "width_mult": NUMBER, "small_input": bool, "num_classes": int,
               "batch_size": int, "device": str, "fixed_ms": NUMBER, "layers": list, "tables": dict,
               "calibration": list, "validation": list}
Clock = Callable[[], float]


def setting(arch: str, input_size: int, width_mult: float, small_input: bool, num_classes: int,
            batch_size: int) -> dict:
    """What a table was measured for; it is only valid for a search with the same values."""
    return {"arch": arch, "input_size": input_size, "width_mult": width_mult, "small_input": small_input,
            "num_classes": num_classes, "batch_size": batch_size}


@dataclass
class LatencyTable:
    """Milliseconds per layer signature on a grid of channel counts, and the whole-network calibration."""

    arch: str                         # the family: resnet50 or mobilenetv2
    input_size: int
    width_mult: float
    small_input: bool
    num_classes: int
    batch_size: int
    device: str                       # where it was measured (a table may be used on another device)
    fixed_ms: float                   # pooling + classifier: the same for every gene
    layers: list[dict]                # per timed part, in spec order: {"key", "in_slot", "out_slot"}
    tables: dict[str, dict]           # key -> {"cin": [...], "cout": [...], "ms": [[...]]}
    calibration: list[dict]           # uniform-width genes: {"id", "lut_ms" (raw sum), "measured_ms"}
    validation: list[dict] = field(default_factory=list)  # estimate vs measured for a few random genes
    version: int = VERSION

    def __post_init__(self) -> None:
        points = sorted((c["lut_ms"], c["measured_ms"]) for c in self.calibration)
        # a wider network is never faster: noise that says otherwise is flattened, keeping the
        # estimate monotone in the raw sum
        self._raw: list[float] = []
        self._ms: list[float] = []
        for raw, ms in points:
            if self._raw and raw <= self._raw[-1]:
                continue
            self._raw.append(raw)
            self._ms.append(max(ms, self._ms[-1]) if self._ms else ms)

    def check_slots(self, num_slots: int) -> None:
        """Every layer reads gene slots of a gene of ``num_slots`` ids (``ValueError`` otherwise)."""
        for layer in self.layers:
            if not (IMAGE_SLOT <= layer["in_slot"] < num_slots and 0 <= layer["out_slot"] < num_slots):
                raise ValueError(f"layer {layer['key']} reads gene slots {layer['in_slot']} and {layer['out_slot']}, "
                                 f"outside the gene's 0..{num_slots - 1}")

    def setting(self) -> dict:
        return setting(self.arch, self.input_size, self.width_mult, self.small_input, self.num_classes,
                       self.batch_size)

    def check_setting(self, wanted: dict) -> None:
        """The table was measured for the ``wanted`` setting (``ValueError`` naming every difference)."""
        diffs = [f"{k} {v} (this search: {wanted[k]})" for k, v in self.setting().items() if v != wanted[k]]
        if diffs:
            raise ValueError(f"measured for {', '.join(diffs)}")

    def raw(self, gene: Gene, bases: tuple[int, ...]) -> float:
        """The sum of the gene's table entries (ms), before calibration."""
        total = self.fixed_ms
        for layer in self.layers:
            t = self.tables[layer["key"]]
            slot = layer["in_slot"]
            cin = IMAGE_CHANNELS if slot == IMAGE_SLOT else channels(bases[slot], gene[slot])
            cout = channels(bases[layer["out_slot"]], gene[layer["out_slot"]])
            total += _bilinear(t["cin"], t["cout"], t["ms"], cin, cout)
        return total

    def __call__(self, gene: Gene, bases: tuple[int, ...]) -> float:
        """The estimated latency (ms) of the PrunedNet of ``gene``."""
        return self.calibrated(self.raw(gene, bases))

    def calibrated(self, raw: float) -> float:
        """A raw sum mapped onto the whole-network measurements of the calibration genes."""
        if raw <= self._raw[0]:
            return raw * self._ms[0] / self._raw[0]
        if raw >= self._raw[-1]:
            return raw * self._ms[-1] / self._raw[-1]
        j = bisect.bisect_right(self._raw, raw) - 1
        a = (raw - self._raw[j]) / (self._raw[j + 1] - self._raw[j])
        return (1 - a) * self._ms[j] + a * self._ms[j + 1]

    def save(self, path: Path) -> None:
        save_text(json.dumps(asdict(self)), path)

    @classmethod
    def load(cls, path: Path) -> LatencyTable:
        """Read a saved table; ``ValueError`` says what is wrong with a file that is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"cannot read it ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("not a latency table (not JSON: corrupt, or another kind of file)") from None
        if not isinstance(data, dict) or "layers" not in data:
            raise ValueError("not a latency table (JSON without its fields)")
        if data.get("version") != VERSION:
            raise ValueError(f"a latency table of format {data.get('version', 1)}, this version reads format {VERSION}")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"not a complete latency table (fields {sorted(set(data) ^ names)} differ)")
        try:
            table = cls(**data)
            table._check()
        except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError, AttributeError) as e:
            raise ValueError(f"an inconsistent latency table ({type(e).__name__}: {e})") from None
        return table

    def _check(self) -> None:
        """Every field has its type, every layer valid gene slots and a grid of positive timings of the
        right shape (a damaged file is refused, not misread)."""
        for name, kind in FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise ValueError(f"field {name} is {json.dumps(value)[:40]}")
        for layer in self.layers:
            if not (isinstance(layer.get("in_slot"), int) and isinstance(layer.get("out_slot"), int)):
                raise ValueError(f"layer {layer.get('key')} has no integer gene slots")
            t = self.tables[layer["key"]]
            if not all(isinstance(c, int) and c >= 0 for c in (*t["cin"], *t["cout"])):  # cin [0]: not timed by it
                raise ValueError(f"channel lists of {layer['key']} are not counts of channels")
            if len(t["ms"]) != len(t["cin"]) or any(len(row) != len(t["cout"]) for row in t["ms"]):
                raise ValueError(f"grid of {layer['key']} does not match its channel lists")
            if not all(v > 0 for row in t["ms"] for v in row):
                raise ValueError(f"timings of {layer['key']} are not all positive")
        if not self._raw or min(self._raw) <= 0:
            raise ValueError("no calibration measurements")


def _interp_index(points: list[int], x: int) -> tuple[int, int, float]:
    if len(points) == 1:
        return 0, 0, 0.0
    j = min(max(bisect.bisect_right(points, x) - 1, 0), len(points) - 2)
    return j, j + 1, (x - points[j]) / (points[j + 1] - points[j])


def _bilinear(xs: list[int], ys: list[int], ms: list[list[float]], x: int, y: int) -> float:
    i0, i1, a = _interp_index(xs, x)
    j0, j1, b = _interp_index(ys, y)
    return ((1 - a) * ((1 - b) * ms[i0][j0] + b * ms[i0][j1]) + a * ((1 - b) * ms[i1][j0] + b * ms[i1][j1]))


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3,
            clock: Clock = time.perf_counter) -> float:
    """The fastest of ``repeats`` timings of ``fn()`` in milliseconds (CUDA synchronized around each)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        best = float("inf")
        for _ in range(repeats):
            sync()
            t = clock()
            fn()
            sync()
            best = min(best, clock() - t)
    return best * 1e3


class _Tail(nn.Module):
    """What a PrunedNet block does after its convs: residual add, activation, max-pool."""

    def __init__(self, block: BlockSpec) -> None:
        super().__init__()
        self.add = block.shortcut is not None or block.identity
        self.act = ACTIVATIONS[block.act](inplace=True) if block.act else nn.Identity()
        self.pool = nn.MaxPool2d(3, 2, 1) if block.maxpool else nn.Identity()

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(y + residual if self.add else y))


def _parts(spec: ArchSpec, input_size: int) -> tuple[list[tuple[ConvSpec | BlockSpec, int]], int]:
    """Every timed part of the spec (its convs, and the tail of every block that has one) with the
    spatial size of its input, in spec order; and the final size."""
    blocks, final = walk(spec, input_size)
    out: list[tuple[ConvSpec | BlockSpec, int]] = []
    for placed in blocks:
        out += [(c.conv, c.in_size) for c in placed.convs]
        b = placed.block
        if b.shortcut is not None or b.identity or b.act or b.maxpool:
            out.append((b, placed.out_size))
    return out, final


def _choices(spec: ArchSpec, slot: int, grid: tuple[int, ...]) -> list[int]:
    if slot == IMAGE_SLOT:
        return [IMAGE_CHANNELS]
    ids = [FULL_ID] if slot in spec.layout.fixed else list(grid)
    return sorted({channels(spec.bases[slot], i) for i in ids})


def _time_conv(spec: ArchSpec, conv: ConvSpec, size: int, cin: int, cout: int, device: torch.device,
               batch_size: int, repeats: int, clock: Clock) -> float:
    ch = {conv.in_slot: cout if conv.depthwise else cin, conv.out_slot: cout}
    module = ConvBN(conv, [ch.get(i, 0) for i in range(len(spec.bases))]).to(device).eval()
    x = torch.randn(batch_size, ch[conv.in_slot] if conv.in_slot != IMAGE_SLOT else IMAGE_CHANNELS, size, size,
                    device=device)
    return time_ms(lambda: module(x), device, repeats, clock=clock)


def _time_tail(block: BlockSpec, size: int, cout: int, device: torch.device, batch_size: int, repeats: int,
               clock: Clock) -> float:
    tail = _Tail(block).to(device).eval()
    y, r = (torch.randn(batch_size, cout, size, size, device=device) for _ in range(2))
    return time_ms(lambda: tail(y, r), device, repeats, clock=clock)


def build(spec: ArchSpec, input_size: int, num_classes: int, device: torch.device, batch_size: int = 1,
          repeats: int = 20, grid: tuple[int, ...] = GRID, *, width_mult: float, small_input: bool,
          clock: Clock = time.perf_counter) -> LatencyTable:
    """Time every distinct part of ``spec`` on the channel grid, the gene-independent rest, and the
    uniform-width networks the raw sums are calibrated on. ``width_mult`` and ``small_input`` are
    the values ``spec`` was built with (recorded, so the table is only used for that network)."""
    layers, tables = [], {}
    parts, final_size = _parts(spec, input_size)
    for part, size in parts:
        if isinstance(part, BlockSpec):
            out_slot = part.convs[-1].out_slot
            residual = "add" if part.shortcut is not None or part.identity else ""
            key = f"tail{residual}_{size}px_{part.act}{'_pool' if part.maxpool else ''}_{spec.bases[out_slot]}"
            layers.append({"key": key, "in_slot": out_slot, "out_slot": out_slot})
            if key not in tables:
                couts = _choices(spec, out_slot, grid)
                tables[key] = {"cin": [0], "cout": couts, "ms": [[
                    _time_tail(part, size, cout, device, batch_size, repeats, clock) for cout in couts]]}
            continue
        conv = part
        key = f"k{conv.kernel}s{conv.stride}{'dw' if conv.depthwise else ''}_{size}px_{conv.act}_" \
              f"{'img' if conv.in_slot == IMAGE_SLOT else spec.bases[conv.in_slot]}x{spec.bases[conv.out_slot]}"
        layers.append({"key": key, "in_slot": conv.in_slot, "out_slot": conv.out_slot})
        if key in tables:
            continue
        cins = [0] if conv.depthwise else _choices(spec, conv.in_slot, grid)
        couts = _choices(spec, conv.out_slot, grid)
        tables[key] = {"cin": cins, "cout": couts, "ms": [
            [_time_conv(spec, conv, size, cin, cout, device, batch_size, repeats, clock) for cout in couts]
            for cin in cins]}
    # pooling and classifier do not depend on the gene: timed once on the classifier's fixed input
    width = spec.bases[spec.classifier_slot]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)).to(device).eval()
    feats = torch.randn(batch_size, width, final_size, final_size, device=device)
    fixed = time_ms(lambda: head(feats), device, repeats, clock=clock)
    uncalibrated = LatencyTable(spec.layout.family, input_size, width_mult, small_input, num_classes, batch_size,
                                str(device), fixed, layers, tables, [])
    layout, calibration = spec.layout, []
    for i in grid:
        gene = tuple(FULL_ID if p in layout.fixed else i for p in range(len(layout)))
        # three times the repeats: every estimate leans on these few measurements
        calibration.append({"id": i, "lut_ms": uncalibrated.raw(gene, spec.bases),
                            "measured_ms": measure(PrunedNet(spec, gene, num_classes), input_size, device,
                                                   batch_size, 3 * repeats, clock)})
    return replace(uncalibrated, calibration=calibration)


def measure(net: PrunedNet, input_size: int, device: torch.device, batch_size: int = 1, repeats: int = 20,
            clock: Clock = time.perf_counter) -> float:
    """End-to-end latency (ms, the fastest of ``repeats`` runs) of a whole network in eval mode."""
    net = net.to(device).eval()
    x = torch.randn(batch_size, IMAGE_CHANNELS, input_size, input_size, device=device)
    return time_ms(lambda: net(x), device, repeats, clock=clock)


def default_path(folder: Path, family: str, device: torch.device, input_size: int, width_mult: float,
                 batch_size: int) -> Path:
    """Where a table of this device and network is kept unless ``--lut`` names one."""
    name = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    return folder / f"latency_{family}_{name}_{input_size}px_w{width_mult:g}_bs{batch_size}.json"


def build_validated(net, input_size: int, device: torch.device, batch_size: int, repeats: int, width_mult: float,
                    small_input: bool, seed: int, log: Callable[[str], None]) -> LatencyTable:
    """Measure a table on this device and check its estimates against whole-network timings of 8
    random genes (kept in ``validation``, their errors logged)."""
    log(f"measuring the latency table on {device} (batch {batch_size}) ...")
    table = build(net.spec, input_size, net.num_classes, device, batch_size, repeats, width_mult=width_mult,
                  small_input=small_input)
    layout, rng = net.spec.layout, random.Random(seed)
    # random genes only: the calibration already measured the uniform-width ones (full, narrowest, ...)
    genes = [layout.sample(rng) for _ in range(8)]
    table.validation = [{"gene": layout.format(g), "lut_ms": table(g, net.spec.bases),
                         "measured_ms": measure(net.materialize(g), input_size, device, batch_size, repeats)}
                        for g in genes]
    errors = [abs(v["lut_ms"] / v["measured_ms"] - 1) * 100 for v in table.validation]
    log(f"LUT estimate vs measured end-to-end on {len(genes)} random genes: mean |error| "
        f"{sum(errors) / len(errors):.1f}%, max {max(errors):.1f}%")
    for v in table.validation:
        log(f"  lut {v['lut_ms']:.3f} ms, measured {v['measured_ms']:.3f} ms: {v['gene']}")
    return table
