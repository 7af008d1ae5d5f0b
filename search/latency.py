"""Latency lookup table: per-layer latency measured on this device, summed to estimate a gene's.

MetaPruning's paper budgets latency with a table of per-layer latencies; no implementation was
released. Here every distinct conv (kernel, stride, depthwise, input size, base widths) is timed
as conv → BN → activation in eval mode on a grid of channel counts (the gene ids in ``GRID`` for
its input and output slot), and a gene's latency is the sum of its layers' latencies, each
bilinearly interpolated in (input channels, output channels), plus the measured cost of the
parts no gene changes (pooling, classifier). ``compare`` reports how close that sum comes to
end-to-end measurements of whole PrunedNets.
"""
from __future__ import annotations

import bisect
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import ArchSpec, Gene, PrunedNet
from models.gene import channels
from models.layers import IMAGE_CHANNELS, IMAGE_SLOT, ConvSpec, _ConvBN, conv_out_size

GRID = (0, 5, 10, 15, 20, 25, 30)


@dataclass
class LatencyTable:
    """Milliseconds per conv signature on a grid of (input, output) channel counts."""

    device: str
    input_size: int
    batch_size: int
    fixed_ms: float                   # pooling + classifier: the same for every gene
    layers: list[dict]                # per conv of the spec: {"key", "in_slot", "out_slot"}
    tables: dict[str, dict]           # key -> {"cin": [...], "cout": [...], "ms": [[...]]}
    validation: list[dict] = field(default_factory=list)  # LUT sum vs measured for a few genes

    def __call__(self, gene: Gene, bases: tuple[int, ...]) -> float:
        total = self.fixed_ms
        for layer in self.layers:
            t = self.tables[layer["key"]]
            slot = layer["in_slot"]
            cin = IMAGE_CHANNELS if slot == IMAGE_SLOT else channels(bases[slot], gene[slot])
            cout = channels(bases[layer["out_slot"]], gene[layer["out_slot"]])
            total += _bilinear(t["cin"], t["cout"], t["ms"], cin, cout)
        return total

    def save(self, path: Path) -> None:
        from utils.checkpoint import save_text

        save_text(json.dumps(asdict(self)), path)

    @classmethod
    def load(cls, path: Path) -> "LatencyTable":
        return cls(**json.loads(Path(path).read_text()))


def _interp_index(points: list[int], x: int) -> tuple[int, int, float]:
    if len(points) == 1:
        return 0, 0, 0.0
    j = min(max(bisect.bisect_right(points, x) - 1, 0), len(points) - 2)
    return j, j + 1, (x - points[j]) / (points[j + 1] - points[j])


def _bilinear(xs: list[int], ys: list[int], ms: list[list[float]], x: int, y: int) -> float:
    i0, i1, a = _interp_index(xs, x)
    j0, j1, b = _interp_index(ys, y)
    return ((1 - a) * ((1 - b) * ms[i0][j0] + b * ms[i0][j1]) + a * ((1 - b) * ms[i1][j0] + b * ms[i1][j1]))


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds (synchronizing CUDA around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def _conv_inputs(spec: ArchSpec, input_size: int) -> tuple[list[tuple[ConvSpec, int]], int]:
    """Every conv of the spec with the spatial size of its input, in spec order, and the final size."""
    out, size = [], input_size
    for block in spec.blocks:
        block_in = size
        for conv in block.convs:
            out.append((conv, size))
            size = conv_out_size(size, conv.kernel, conv.stride)
        if block.shortcut is not None:
            out.append((block.shortcut, block_in))
        if block.maxpool:
            size = conv_out_size(size, 3, 2)
    return out, size


def _choices(spec: ArchSpec, slot: int, grid: tuple[int, ...]) -> list[int]:
    if slot == IMAGE_SLOT:
        return [IMAGE_CHANNELS]
    ids = [30] if slot in spec.layout.fixed else list(grid)
    return sorted({channels(spec.bases[slot], i) for i in ids})


def build(spec: ArchSpec, input_size: int, num_classes: int, device: torch.device, batch_size: int = 1,
          repeats: int = 20, grid: tuple[int, ...] = GRID) -> LatencyTable:
    """Time every distinct conv of ``spec`` on the channel grid, and the gene-independent rest."""
    layers, tables = [], {}
    convs, final_size = _conv_inputs(spec, input_size)
    for conv, size in convs:
        key = f"k{conv.kernel}s{conv.stride}{'dw' if conv.depthwise else ''}_{size}px_{conv.act}_" \
              f"{'img' if conv.in_slot == IMAGE_SLOT else spec.bases[conv.in_slot]}x{spec.bases[conv.out_slot]}"
        layers.append({"key": key, "in_slot": conv.in_slot, "out_slot": conv.out_slot})
        if key in tables:
            continue
        cins = [0] if conv.depthwise else _choices(spec, conv.in_slot, grid)
        couts = _choices(spec, conv.out_slot, grid)
        ms = []
        for cin in cins:
            row = []
            for cout in couts:
                ch = {conv.in_slot: cout if conv.depthwise else cin, conv.out_slot: cout}
                module = _ConvBN(conv, [ch.get(i, 0) for i in range(len(spec.bases))]).to(device).eval()
                x = torch.randn(batch_size, ch[conv.in_slot] if conv.in_slot != IMAGE_SLOT else IMAGE_CHANNELS,
                                size, size, device=device)
                row.append(time_ms(lambda m=module, inp=x: m(inp), device, repeats))
            ms.append(row)
        tables[key] = {"cin": cins, "cout": couts, "ms": ms}
    # pooling and classifier do not depend on the gene: timed once on the classifier's fixed input
    width = spec.bases[spec.classifier_slot]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)).to(device).eval()
    feats = torch.randn(batch_size, width, final_size, final_size, device=device)
    fixed = time_ms(lambda: head(feats), device, repeats)
    return LatencyTable(str(device), input_size, batch_size, fixed, layers, tables)


def measure(net: PrunedNet, input_size: int, device: torch.device, batch_size: int = 1, repeats: int = 20) -> float:
    """End-to-end latency (ms, median) of a whole network in eval mode."""
    net = net.to(device).eval()
    x = torch.randn(batch_size, IMAGE_CHANNELS, input_size, input_size, device=device)
    return time_ms(lambda: net(x), device, repeats)
