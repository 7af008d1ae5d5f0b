"""How much of the search's candidate scoring waits for data: streamed JPEGs against decoded-once sets.

Run: ``.venv/bin/python benchmarks/search_data.py [--device cpu|cuda] [--classes 100] [--workers 2]``.

Writes an ImageNet-shaped JPEG folder (500 x 375 photos-sized images, ``--classes`` classes, a
sub-validation split of ``--subval-per-class`` images per class, scored at 224 px) in a scratch
folder, then scores the same candidates two ways with a PruningNet (ResNet50 at ``--width``):

- ``streamed``: what the search did before: the recalibration batches held as float tensors, the
  sub-validation split read from its JPEG files again for every candidate by a DataLoader;
- ``decoded``: what it does now (``search.evaluator.search_evaluator``): both decoded once into
  uint8 (``data.cache``), normalized per batch on the device;
- ``floats held``: the floor, no data work at all: every batch already normalized, as floats, on
  the device (4x the memory of ``decoded``: 30 GB for ImageNet's split, which is why it is not the
  search's way).

For each: the one-time decoding, the first candidate, then candidates/min over the next ones, the
share of their scoring time spent waiting for batches (creating the data iterator, fetching,
copying and normalizing a batch), and the share of their time above the floor's (what data costs
in all, including decoding workers competing with the forward passes for the CPU). Writes
``benchmarks/results/search_data_{device}.json``.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parent.parent
from benchmarks.throughput import device_name, save_result, sync
from data import get_data, make_loader
from data.synthetic import make_image_folder
from models import create_model
from search.evaluator import CandidateEvaluator, search_evaluator


class Timed:
    """An iterable that adds the time its consumer waits for each item to ``seconds``."""

    def __init__(self, iterable: Iterable, device: torch.device) -> None:
        self.iterable, self.device, self.seconds = iterable, device, 0.0

    def __iter__(self) -> Iterator:
        began = time.perf_counter()
        it = iter(self.iterable)  # a non-persistent loader starts its workers here
        self.seconds += time.perf_counter() - began
        while True:
            began = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                sync(self.device)  # the copy and normalization of the batch, on a GPU too
                self.seconds += time.perf_counter() - began
            yield item


def score(evaluator: CandidateEvaluator, genes: list, device: torch.device) -> dict[str, float]:
    """Time the first candidate alone, then the rest: candidates/min and the share waiting for data."""
    recal, batches = Timed(evaluator.recal, device), Timed(evaluator.eval_batches, device)
    evaluator.recal, evaluator.eval_batches = recal, batches
    sync(device)
    began = time.perf_counter()
    evaluator.top1(genes[0])
    sync(device)
    first = time.perf_counter() - began
    recal.seconds = batches.seconds = 0.0
    began = time.perf_counter()
    for gene in genes[1:]:
        evaluator.top1(gene)
    sync(device)
    total = time.perf_counter() - began
    return {"first_candidate_s": round(first, 2), "candidates_per_min": round(60 * (len(genes) - 1) / total, 2),
            "seconds_per_candidate": round(total / (len(genes) - 1), 2),
            "data_share": round((recal.seconds + batches.seconds) / total, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--subval-per-class", type=int, default=20)
    p.add_argument("--train-per-class", type=int, default=25, help="training images per class (besides the split)")
    p.add_argument("--width", type=float, default=0.25, help="ResNet50 width multiplier")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--recal-batches", type=int, default=4)
    p.add_argument("--candidates", type=int, default=4, help="scored per mode, the first timed on its own")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--root", default=None, help="reuse this generated folder (written when missing)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root or Path(scratch) / "imagenet_like")
        if not (root / "train").is_dir():
            began = time.perf_counter()
            make_image_folder(root, args.classes, args.subval_per_class + args.train_per_class, 1, size=(500, 375))
            print(f"wrote {root} in {time.perf_counter() - began:.0f} s")
        data = get_data("imagenet", str(root), 224, val_per_class=args.subval_per_class, defer_split=True,
                        split_dir=Path(scratch) / "splits")
        torch.manual_seed(0)
        net = create_model("resnet50_pruningnet", num_classes=args.classes, width_mult=args.width).to(device).eval()
        rng = random.Random(0)
        genes = [net.spec.layout.sample(rng) for _ in range(args.candidates)]

        began = time.perf_counter()
        order = torch.randperm(len(data.train_eval), generator=torch.Generator().manual_seed(0))
        order = order[: args.recal_batches * args.batch_size].tolist()
        recal = [x.to(device) for x, _ in DataLoader(Subset(data.train_eval, order), batch_size=args.batch_size,
                                                     num_workers=args.workers)]
        streamed = CandidateEvaluator(net, recal, make_loader(data.subval, args.batch_size, False, args.workers,
                                                               pin_memory=device.type == "cuda"), device)
        rows = [{"mode": "streamed", "decode_once_s": round(time.perf_counter() - began, 2),
                 **score(streamed, genes, device)}]
        del streamed, recal
        began = time.perf_counter()
        decoded = search_evaluator(net, data, args.recal_batches, args.batch_size, 0, device, args.workers)
        sync(device)
        rows.append({"mode": "decoded", "decode_once_s": round(time.perf_counter() - began, 2),
                     "kept": decoded.eval_batches.describe(), **score(decoded, genes, device)})
        held = CandidateEvaluator(net, list(decoded.recal), list(decoded.eval_batches), device)
        del decoded
        rows.append({"mode": "floats held", "decode_once_s": None, **score(held, genes, device)})
    floor = rows[-1]["seconds_per_candidate"]
    for r in rows:
        r["above_floor"] = round(1 - floor / r["seconds_per_candidate"], 4)

    result = {"device": device_name(device), "torch": torch.__version__, "command": " ".join(sys.argv),
              "setting": f"ResNet50 PruningNet x{args.width:g}, 224 px, {len(data.subval)} sub-validation images "
                         f"({args.classes} classes), BN recalibration {args.recal_batches}x{args.batch_size}, "
                         f"batch {args.batch_size}, {args.workers} loader workers, {args.candidates} candidates",
              "rows": rows}
    save_result(args.out, f"search_data_{device.type}.json", result)
    print(f"device: {result['device']}; {result['setting']}")
    print("| scoring data | decoded once (s) | first candidate (s) | candidates/min after | waiting for data | "
          "time above the floor |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['decode_once_s'] if r['decode_once_s'] is not None else '–'} | "
              f"{r['first_candidate_s']} | {r['candidates_per_min']} | {100 * r['data_share']:.1f}% | "
              f"{100 * r['above_floor']:.1f}% |")


if __name__ == "__main__":
    main()
