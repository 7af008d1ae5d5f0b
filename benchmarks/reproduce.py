"""Small-scale reproduction of MetaPruning's two claims on Fashion-MNIST (CPU).

1. At equal MACs, the searched per-layer widths beat uniformly scaled widths: for each budget and
   seed, a PruningNet is trained, the search picks a gene, and it is retrained from scratch beside
   the widest uniform network of no more MACs, with the same recipe (``pipeline.py``'s stages).
2. The PruningNet ranks candidates like training them would: Kendall's tau between the top-1 the
   PruningNet gives a gene (generated weights, recalibrated BN, sub-validation split) and the top-1
   of that gene trained from scratch, for genes spread over the budget range.

Run: ``.venv/bin/python benchmarks/reproduce.py [--arch resnet50] [--seeds 0 1 2] [--budgets 0.25 0.5]
[--tau-genes 12] [--quick]``. Runs go to ``runs/reproduce/``; the summary to
``benchmarks/results/reproduce_{arch}.json`` and ``docs/results.md`` with the plots beside it.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data import fixed_batches, get_data, make_loader  # noqa: E402
from pipeline import FULL, QUICK, Pipeline, compare, inside  # noqa: E402
from search.evaluator import CandidateEvaluator, cached_batches  # noqa: E402
from utils import checkpoint  # noqa: E402

# The main job's recipe, scaled up where the 15-minute limit made it thin: the PruningNet trained one
# epoch longer, a 2.5x larger sub-validation split and a 2x larger recalibration set (a less noisy
# proxy), a search of 144 instead of 80 candidates, and retraining one epoch longer (less noise between
# retrained networks). Sized so that 3 seeds x 2 budgets and 12 tau genes take under two hours here.
REPRO = replace(FULL, pruning_epochs=5, retrain_epochs=4, val_per_class=500, recal_batches=8, population=24,
                select=6, mutation=9, crossover=9, iterations=6)


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two equally long score lists."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    n = concordant + discordant
    return (concordant - discordant) / (((n + ties_a) * (n + ties_b)) ** 0.5 or 1)


def spread_genes(p: Pipeline, n: int, low: float, high: float, seed: int) -> list:
    """``n`` distinct random genes whose MACs spread evenly over [low, high] of the full network's.

    Uniform genes crowd around half the full MACs, so each pool gene draws its ids uniformly from a
    random sub-range of 0..30: the pool then covers every cost from the narrowest to the full gene.
    """
    rng, full = random.Random(seed), p.costs(p.layout.full()).macs
    macs = {}
    for _ in range(20000):
        g = p.layout.sample(rng, *sorted((rng.randrange(31), rng.randrange(31))))
        macs[g] = p.costs(g).macs
    picked = []
    for k in range(n):
        target = (low + (high - low) * (k + 0.5) / n) * full
        picked.append(min((g for g in macs if g not in picked), key=lambda g: abs(macs[g] - target)))
    return picked


def proxy_scores(p: Pipeline, genes: list) -> list[float]:
    """The top-1 the PruningNet gives each gene, exactly as the search scores candidates."""
    with inside(p.run_dir):
        net = checkpoint.build_model(checkpoint.load(p.pruningnet))
        data = get_data("fashionmnist", None, 32, p.r.val_per_class, hold_out=True, seed=p.seed)
        recal = fixed_batches(data.train_eval, p.r.recal_batches, p.r.batch, p.seed)
        evaluator = CandidateEvaluator(net, recal, cached_batches(make_loader(data.subval, p.r.batch, False, 0),
                                                                  torch.device("cpu")), torch.device("cpu"))
        return [evaluator.top1(g) for g in genes]


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def plot(tau_rows: list[dict], tau: float, out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    sc = ax.scatter([r["proxy_top1"] for r in tau_rows], [r["scratch_top1"] for r in tau_rows],
                    c=[r["mmac"] for r in tau_rows], cmap="viridis")
    fig.colorbar(sc, ax=ax, label="MMac")
    ax.set_xlabel("PruningNet top-1 (%), sub-validation split")
    ax.set_ylabel("trained from scratch top-1 (%), test set")
    ax.set_title(f"proxy quality: Kendall tau = {tau:.2f} ({len(tau_rows)} genes)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50", choices=("resnet50", "mobilenetv2"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--tau-genes", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="tiny recipe: checks the machinery, not the claims")
    args = ap.parse_args()
    recipe, start = (QUICK if args.quick else REPRO), time.perf_counter()
    base = Path("runs/reproduce") / f"{args.arch}{'_quick' if args.quick else ''}"
    comparisons, pipes = [], {}
    for seed in args.seeds:
        p = pipes[seed] = Pipeline(args.arch, seed, recipe, base / f"seed{seed}")
        p.train_pruningnet()
        for fraction in args.budgets:
            comparisons.append({"seed": seed, **compare(p, fraction)})
    p = pipes[args.seeds[0]]
    genes = spread_genes(p, args.tau_genes, 0.15, 0.9, seed=1)
    proxy = proxy_scores(p, genes)
    tau_rows = []
    for i, (g, score) in enumerate(zip(genes, proxy)):
        scratch = p.retrain(g, f"_tau{i:02d}")
        tau_rows.append({"gene": p.layout.format(g), "mmac": round(p.costs(g).macs / 1e6, 3),
                         "proxy_top1": round(score, 2), "scratch_top1": round(scratch["top1"], 2)})
    tau = kendall_tau([r["proxy_top1"] for r in tau_rows], [r["scratch_top1"] for r in tau_rows])

    lines = [f"## Small-scale reproduction ({args.arch}, Fashion-MNIST, CPU)", "",
             f"Command: `.venv/bin/python {' '.join(sys.argv)}` ({(time.perf_counter() - start) / 3600:.1f} h on "
             f"this 2-core machine). Recipe: {json.dumps(asdict(recipe))}.", "",
             "| budget (MACs) | searched top-1 (%) | uniform top-1 (%) | searched − uniform | seeds |",
             "|---|---|---|---|---|"]
    summary = []
    for fraction in args.budgets:
        rows = [c for c in comparisons if c["budget"] == fraction]
        s = [next(r["top1"] for r in c["results"] if r["network"] == "searched") for c in rows]
        u = [next(r["top1"] for r in c["results"] if r["network"] == "uniform") for c in rows]
        d = [a - b for a, b in zip(s, u)]
        summary.append({"budget": fraction, "searched": s, "uniform": u, "difference": d})
        lines.append(f"| {fraction:.0%} ({rows[0]['budget_mmac']} MMac) | {mean_std(s)} | {mean_std(u)} | "
                     f"{mean_std(d)} | {len(rows)} |")
    lines += ["", f"Kendall tau between PruningNet top-1 and from-scratch top-1 over {len(tau_rows)} genes "
              f"(15–90% of the full MACs, seed {args.seeds[0]}): **{tau:.3f}**", "",
              "![proxy vs from-scratch top-1](reproduce_tau.png)", ""]
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    result = {"arch": args.arch, "command": " ".join(sys.argv), "recipe": asdict(recipe), "summary": summary,
              "comparisons": comparisons, "tau": tau, "tau_genes": tau_rows,
              "hours": round((time.perf_counter() - start) / 3600, 2)}
    (out / f"reproduce_{args.arch}{'_quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=1))
    if not args.quick:
        plot(tau_rows, tau, ROOT / "docs" / "reproduce_tau.png")
        (ROOT / "docs" / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
