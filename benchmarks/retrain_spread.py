"""How much one gene's retrained top-1 moves with the seed: the noise floor of every searched-vs-uniform
comparison in ``benchmarks/reproduce.py``.

The uniform gene of each budget (the widest uniform network within it, as the comparison uses) is
trained from scratch with the reproduction's retraining recipe, once per seed; no PruningNet is
involved. Run: ``.venv/bin/python benchmarks/retrain_spread.py [--budgets 0.25] [--seeds 0 1 2 3 4]
[--retrain-epochs 12]``; runs go to ``runs/retrain_spread/``, the result to
``benchmarks/results/retrain_spread_{arch}_e{epochs}.json``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.reproduce import REPRO
from benchmarks.throughput import save_result
from models import list_families
from pipeline import Pipeline, uniform_gene

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50", choices=list_families())
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--retrain-epochs", type=int, default=REPRO.retrain_epochs)
    args = ap.parse_args()
    recipe = replace(REPRO, retrain_epochs=args.retrain_epochs)
    base = ROOT / "runs" / "retrain_spread" / f"{args.arch}_e{recipe.retrain_epochs}"
    budgets = []
    for fraction in args.budgets:
        rows = []
        for seed in args.seeds:
            p = Pipeline(args.arch, seed, recipe, base / f"seed{seed}", cpu=True)
            gene = uniform_gene(p.layout, p.costs, int(p.budget_mmac(fraction) * 1e6))
            start = time.perf_counter()
            top1 = p.retrain(gene, f"_uniform{round(fraction * 100)}")["top1"]
            rows.append({"seed": seed, "top1": round(top1, 2), "retrain_s": round(time.perf_counter() - start, 1)})
            print(f"budget {fraction:.0%} seed {seed}: {top1:.2f}", flush=True)
        top1s = [r["top1"] for r in rows]
        budgets.append({"budget": fraction, "gene": p.layout.format(gene), "mmac": round(p.costs(gene).macs / 1e6, 3),
                        "runs": rows, "mean": round(statistics.mean(top1s), 2),
                        "std": round(statistics.stdev(top1s), 2) if len(top1s) > 1 else 0.0,
                        "spread": round(max(top1s) - min(top1s), 2)})
        print(f"budget {fraction:.0%}: mean {budgets[-1]['mean']}, std {budgets[-1]['std']}, "
              f"max - min {budgets[-1]['spread']}")
    save_result(str(ROOT / "benchmarks" / "results"), f"retrain_spread_{args.arch}_e{recipe.retrain_epochs}.json",
                {"arch": args.arch, "recipe": asdict(recipe), "budgets": budgets})


if __name__ == "__main__":
    main()
