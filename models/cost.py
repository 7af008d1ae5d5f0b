"""Analytic cost model: MACs (conv + linear, batch 1) and params of the PrunedNet of a gene.

Every conv contributes ``k*k * c_in * c_out / groups * H_out * W_out`` MACs and ``k*k * c_in *
c_out / groups + 2 * c_out`` params (its weight and BN affine); the classifier ``c_in * classes``
MACs and ``(c_in + 1) * classes`` params. Since channel counts depend only on gene slots, the sums
are compiled once per (spec, input size) into coefficients of channel products, so costing a gene
needs no model and takes microseconds.

CLI: ``python -m models.cost --arch resnet50 --gene "[...]" [--input-size 224] [--json]``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .gene import SCALES, Gene
from .pruningnet import IMAGE_CHANNELS, IMAGE_SLOT, ArchSpec, PrunedNet, walk
from .registry import MAX_WIDTH_MULT, get_family, small_input_for

_SCALES_NP = np.array(SCALES)


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int

    @property
    def mmac(self) -> float:
        return self.macs / 1e6


class CostModel:
    """MACs and params of any gene of one spec at one input size and class count."""

    def __init__(self, spec: ArchSpec, input_size: int, num_classes: int) -> None:
        self.spec, self.input_size, self.num_classes = spec, input_size, num_classes
        n = len(spec.bases)
        image = n  # the channel vector gets the image's channel count appended at index n
        macs2: dict[tuple[int, int], int] = defaultdict(int)  # coefficient of ch[a] * ch[b]
        macs1: dict[int, int] = defaultdict(int)              # coefficient of ch[a]
        params2: dict[tuple[int, int], int] = defaultdict(int)
        params1: dict[int, int] = defaultdict(int)
        blocks, size = walk(spec, input_size)
        for placed in (c for b in blocks for c in b.convs):
            self._add_conv(placed.conv, placed.out_size, image, macs2, macs1, params2, params1)
        if size < 1:
            raise ValueError(f"input size {input_size} is too small for {spec.layout.family}")
        macs1[spec.classifier_slot] += num_classes
        params1[spec.classifier_slot] += num_classes
        self._macs2, self._macs1 = tuple((a, b, c) for (a, b), c in macs2.items()), tuple(macs1.items())
        self._params2, self._params1 = tuple((a, b, c) for (a, b), c in params2.items()), tuple(params1.items())
        self._params0 = num_classes
        self._bases = spec.bases

    @staticmethod
    def _add_conv(conv, size: int, image: int, macs2, macs1, params2, params1) -> None:
        k2, hw = conv.kernel * conv.kernel, size * size
        cin = image if conv.in_slot == IMAGE_SLOT else conv.in_slot
        if conv.depthwise:
            macs1[conv.out_slot] += k2 * hw
            params1[conv.out_slot] += k2
        else:
            macs2[(cin, conv.out_slot)] += k2 * hw
            params2[(cin, conv.out_slot)] += k2
        params1[conv.out_slot] += 2  # BN weight and bias

    def __call__(self, gene: Gene) -> Cost:
        """Cost of one validated gene (canonical ids)."""
        ch = [max(1, int(b * SCALES[g])) for b, g in zip(self._bases, gene)]
        ch.append(IMAGE_CHANNELS)
        macs = sum(c * ch[a] * ch[b] for a, b, c in self._macs2) + sum(c * ch[a] for a, c in self._macs1)
        params = (sum(c * ch[a] * ch[b] for a, b, c in self._params2) + sum(c * ch[a] for a, c in self._params1)
                  + self._params0)
        return Cost(macs, params)

    def batch(self, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MACs and params of many genes at once (``genes``: int array ``(N, len(gene))``, canonical ids)."""
        ch = np.maximum(1, np.trunc(np.asarray(self._bases) * _SCALES_NP[genes]).astype(np.int64))
        ch = np.concatenate([ch, np.full((len(ch), 1), IMAGE_CHANNELS, np.int64)], axis=1)
        macs = sum(c * ch[:, a] * ch[:, b] for a, b, c in self._macs2) + sum(c * ch[:, a] for a, c in self._macs1)
        params = (sum(c * ch[:, a] * ch[:, b] for a, b, c in self._params2)
                  + sum(c * ch[:, a] for a, c in self._params1) + self._params0)
        return macs, params


def cost_model(arch: str, input_size: int = 224, num_classes: int = 1000, width_mult: float = 1.0,
               small_input: bool | None = None) -> CostModel:
    """The cost model of an ``--arch`` (or family) name at the given size; small stem by input size."""
    if small_input is None:
        small_input = small_input_for(input_size)
    return CostModel(get_family(arch).build_spec(width_mult, small_input), input_size, num_classes)


def count_by_hooks(model: nn.Module, input_size: int) -> int:
    """MACs of conv and linear layers measured with forward hooks on a real batch-1 forward."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, _inp, _out) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, IMAGE_CHANNELS, input_size, input_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


def ptflops_macs(model: nn.Module, input_size: int) -> int:
    """ptflops' count with its aten backend (conv and matmul MACs only, our convention)."""
    from ptflops import get_model_complexity_info

    macs, _ = get_model_complexity_info(model, (IMAGE_CHANNELS, input_size, input_size), as_strings=False,
                                        print_per_layer_stat=False, verbose=False, backend="aten")
    return int(macs)


def channel_table(spec: ArchSpec, gene: Gene, num_classes: int) -> list[dict[str, object]]:
    """One row per block: ``layer, in, mid, out`` channels of the PrunedNet of ``gene``."""
    ch = spec.channels(gene)
    rows = []
    for block in spec.blocks:
        first, last = block.convs[0], block.convs[-1]
        cin = IMAGE_CHANNELS if first.in_slot == IMAGE_SLOT else ch[first.in_slot]
        mid = ch[first.out_slot] if len(block.convs) > 1 else None
        rows.append({"layer": block.name, "in": cin, "mid": mid, "out": ch[last.out_slot]})
    rows.append({"layer": "classifier", "in": ch[spec.classifier_slot], "mid": None, "out": num_classes})
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'layer':<14}{'in':>7}{'mid':>7}{'out':>7}"]
    lines += [f"{r['layer']:<14}{r['in']:>7}{'-' if r['mid'] is None else r['mid']:>7}{r['out']:>7}" for r in rows]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.cost", description="MACs and params of a gene's PrunedNet")
    p.add_argument("--arch", required=True,
                   help="resnet50 or mobilenetv2 (or an --arch name such as resnet50_prunednet)")
    p.add_argument("--gene", required=True,
                   help='the gene, e.g. "[20, 10, 16, 17, -1, ...]" (a trailing top-1 error is ignored)')
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--table", action="store_true", help="also print the per-block channel table")
    p.add_argument("--ptflops", action="store_true", help="also count with ptflops (aten backend) for comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        family = get_family(args.arch)
        gene = family.layout.parse(args.gene)
        if args.input_size < 1 or args.num_classes < 1:
            raise ValueError(f"--input-size and --num-classes must be positive, got {args.input_size} and "
                             f"{args.num_classes}")
        if not (math.isfinite(args.width_mult) and 0 < args.width_mult <= MAX_WIDTH_MULT):
            raise ValueError(f"--width-mult must be a number in (0, {MAX_WIDTH_MULT:g}], got {args.width_mult}")
        model = cost_model(args.arch, args.input_size, args.num_classes, args.width_mult)
        cost = model(gene)
    except ValueError as e:
        print(f"models.cost: error: {e}", file=sys.stderr)
        return 2
    out = {"arch": family.layout.family, "gene": family.layout.format(gene), "input_size": args.input_size,
           "num_classes": args.num_classes, "width_mult": args.width_mult, "macs": cost.macs,
           "mmac": round(cost.macs / 1e6, 3), "gmac": round(cost.macs / 1e9, 4), "params": cost.params,
           "mparams": round(cost.params / 1e6, 3)}
    table = channel_table(model.spec, gene, args.num_classes)
    if args.ptflops:
        out["ptflops_macs"] = ptflops_macs(PrunedNet(model.spec, gene, args.num_classes), args.input_size)
    if args.json:
        out["channels"] = table
        print(json.dumps(out))
        return 0
    print(f"{out['arch']} gene {out['gene']} at {args.input_size}px, {args.num_classes} classes, "
          f"width x{args.width_mult}")
    print(f"MACs:   {cost.macs:,} ({out['mmac']:.2f} MMac, {out['gmac']:.2f} GMac)")
    print(f"params: {cost.params:,} ({out['mparams']:.2f} M)")
    if args.ptflops:
        print(f"ptflops (aten backend): {out['ptflops_macs']:,} MACs")
    if args.table:
        print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
