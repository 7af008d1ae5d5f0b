"""Data-parallel scaling on the CPU: training images/s with 1 process vs torchrun with 2.

Run: ``.venv/bin/python benchmarks/ddp_scaling.py [--arch resnet50] [--width 0.25]``. Trains the
PruningNet (crop-aware, and with ``--dense-generator-update``) and a PrunedNet (every free id 15) on a
generated 32 px ImageFolder (10 classes) in a scratch folder, once as one process using every core,
once as ``torchrun --nproc-per-node=2`` (gloo) with the cores split between the processes, same
global batch. Throughput is the epoch's images/s from the run's JSONL log. With as many processes as
cores the two runs have the same compute, so the ratio measures what data parallelism costs: above
all the all-reduce of the gradients each step, which for the dense PruningNet means all its generator
weights, for the crop-aware one the generated weights' gradients only. Writes
``benchmarks/results/ddp_scaling_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
from benchmarks.throughput import device_name
from data.synthetic import make_image_folder
from models import create_model, get_family, list_families


def epoch_rate(log: Path) -> float:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"][-1]["img_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", choices=list_families())
    p.add_argument("--width", default="0.25")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--images", type=int, default=160, help="training images per class")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    layout = get_family(args.arch).layout
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_image_folder(work / "img", num_classes=10, train_per_class=args.images, val_per_class=2, size=32)
        common = ["--dataset", "imagenet", "--data-root", "img", "--input-size", "32", "--no-small-input",
                  "--width-mult", args.width, "--epochs", "1", "--workers", "0", "--val-per-class", "2"]
        gene = str([-1 if i in layout.fixed else 15 for i in range(len(layout))])
        rows = []
        for name, net, extra in (("pruningnet, dense generator update", "pruningnet", ["--dense-generator-update"]),
                                 ("pruningnet, crop-aware", "pruningnet", []),
                                 ("prunednet", "prunednet", ["--gene", gene])):
            rates = {}
            for procs in (1, 2):
                launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                                "--standalone", f"--nproc-per-node={procs}"]
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
                subprocess.run([*launcher, str(ROOT / "meta_trainer_exp.py"), "--arch", f"{args.arch}_{net}", *common,
                                *extra, "--batch-size", str(args.batch // procs), "--suffix", f"_p{procs}",
                                "--overwrite"], cwd=work, env=env, check=True, capture_output=True)
                rates[procs] = epoch_rate(work / "logs" / f"imagenet_{args.arch}_{net}_p{procs}.jsonl")
            params = sum(p.numel() for p in create_model(f"{args.arch}_{net}", num_classes=10,
                                                         width_mult=float(args.width),
                                                         **({"gene": layout.parse(gene)} if net == "prunednet" else {}))
                         .parameters())
            rows.append({"network": name, "mparams": round(params / 1e6, 2),
                         "img_s": {"1 process": rates[1], "2 processes": rates[2]},
                         "speedup": round(rates[2] / rates[1], 3)})
    out = {"arch": args.arch, "width_mult": float(args.width), "input_size": 32, "global_batch": args.batch,
           "cores": cores, "device": device_name(torch.device("cpu")), "torch": torch.__version__, "rows": rows,
           "command": " ".join(sys.argv)}
    path = ROOT / "benchmarks" / "results" / "ddp_scaling_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
