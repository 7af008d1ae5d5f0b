"""How close a latency table's estimate comes to measured end-to-end latency.

Run: ``.venv/bin/python benchmarks/latency_lut.py [--arch mobilenetv2] [--input-size 224] [--batch 1]
[--genes 12] [--repeats 10] [--threads N] [--clock wall|thread]``. Builds the table of
``search/latency.py`` for the arch's full-width spec on this device (what ``meta_search_exp.py
--build-lut`` does, calibration included), then times whole PrunedNets of random genes (none of
them a calibration gene) and reports the table's estimate, and its raw per-layer sum, against the
measurement. Writes ``benchmarks/results/latency_lut_{arch}_{device}[_thread].json``.

``--clock thread`` times with this thread's CPU time (``--threads 1`` only): on a machine shared
with other jobs, wall time includes whatever the scheduler gives them, CPU time does not.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
from benchmarks.throughput import device_name
from models import PrunedNet, get_family, list_families
from search import latency


def errors(rows: list[dict], key: str) -> dict[str, float]:
    errs = [abs(r[key] / r["measured_ms"] - 1) * 100 for r in rows]
    return {"mean_abs_error_pct": round(statistics.mean(errs), 2), "max_abs_error_pct": round(max(errs), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mobilenetv2", choices=list_families())
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--genes", type=int, default=12)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--clock", default="wall", choices=("wall", "thread"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.clock == "thread" and (args.threads != 1 or device.type != "cpu"):
        p.error("--clock thread measures one CPU thread: use it with --threads 1 on the CPU")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    family = get_family(args.arch)
    spec = family.build_spec(1.0, False)
    start = time.perf_counter()
    table = latency.build(spec, args.input_size, 1000, device, args.batch, args.repeats, width_mult=1.0,
                          small_input=False, clock=clock)
    build_s = time.perf_counter() - start
    rng = random.Random(0)
    rows = []
    for _ in range(args.genes):
        g = family.layout.sample(rng)
        measured = latency.measure(PrunedNet(spec, g, 1000), args.input_size, device, args.batch, args.repeats, clock)
        rows.append({"gene": family.layout.format(g), "lut_ms": round(table(g, spec.bases), 3),
                     "raw_ms": round(table.raw(g, spec.bases), 3), "measured_ms": round(measured, 3)})
    out = {"arch": args.arch, "input_size": args.input_size, "batch": args.batch, "device": device_name(device),
           "clock": args.clock, "table_entries": sum(len(t["cin"]) * len(t["cout"]) for t in table.tables.values()),
           "build_seconds": round(build_s, 1), **errors(rows, "lut_ms"),
           "raw_sum": errors(rows, "raw_ms"), "calibration": table.calibration, "genes": rows,
           "command": " ".join(sys.argv)}
    suffix = "_thread" if args.clock == "thread" else ""
    path = ROOT / "benchmarks" / "results" / f"latency_lut_{args.arch}_{device.type}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("genes", "calibration")}, indent=1))
    for c in table.calibration:
        print(f"calibration id {c['id']:2d}: raw {c['lut_ms']:8.3f} ms  measured {c['measured_ms']:8.3f} ms")
    for r in rows:
        print(f"lut {r['lut_ms']:8.3f} ms (raw {r['raw_ms']:8.3f})  measured {r['measured_ms']:8.3f} ms  {r['gene']}")


if __name__ == "__main__":
    main()
