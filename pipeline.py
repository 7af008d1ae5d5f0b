"""The main job: the whole MetaPruning pipeline, small, on Fashion-MNIST on the CPU.

1. train a PruningNet; 2. search the best gene under a MACs budget (a fraction of the full
network's MACs); 3. retrain that PrunedNet from scratch, and with the same recipe the widest
uniformly-scaled network of no more MACs; 4. print a results table (top-1, MACs, params, wall
time) and write plots. Each stage runs the project's own entry script, in a run folder
(``runs/{dataset}_{arch}_seed{seed}`` under the current directory), so every checkpoint and log it
writes can be inspected, resumed, or plotted like those of a hand-run command.

``--quick`` runs the same stages with far fewer steps (a smoke run of about two minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import meta_search_exp  # noqa: E402
import meta_trainer_exp  # noqa: E402
from models import Gene, GeneLayout, get_family  # noqa: E402
from models.cost import CostModel, cost_model  # noqa: E402
from utils import checkpoint  # noqa: E402
from utils.config import CHECKPOINT_DIR, Parser, UserError, run_script  # noqa: E402

# Stage settings: (full run, --quick run). Width 0.25 and the ImageNet stem keep a 2-core CPU
# step fast enough for a whole pipeline in minutes; see README "Results" for what they give.
FULL = {"width": "0.25", "pruning_epochs": "4", "retrain_epochs": "3", "steps": "0", "population": "16",
        "select": "4", "mutation": "6", "crossover": "6", "iterations": "5", "val_per_class": "200",
        "recal": "4", "batch": "256"}
QUICK = {"width": "0.125", "pruning_epochs": "1", "retrain_epochs": "1", "steps": "12", "population": "6",
         "select": "2", "mutation": "2", "crossover": "2", "iterations": "2", "val_per_class": "20",
         "recal": "2", "batch": "128"}


def get_args_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.flag("--arch", default="resnet50", choices=("resnet50", "mobilenetv2"))
    p.flag("--budget", type=float, default=0.25, help="MACs budget as a fraction of the full network's")
    p.flag("--seed", type=int, default=0)
    p.flag("--data-root", default=None, help="Fashion-MNIST folder (default: Debian's dataset-fashion-mnist)")
    p.flag("--quick", action="store_true", help="a smoke run of the same stages in about two minutes")
    p.flag("--out", default=None, help="run folder (default runs/fashionmnist_{arch}_seed{seed})")
    return p


@contextmanager
def inside(folder: Path):
    """Run a stage with ``folder`` as working directory: its checkpoints/ and logs/ land there."""
    old = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def uniform_gene(layout: GeneLayout, costs: CostModel, max_macs: int) -> Gene:
    """The widest gene with one id at every free position whose MACs stay within ``max_macs``."""
    for i in range(30, -1, -1):
        gene = layout.validate([30 if p in layout.fixed else i for p in range(len(layout))])
        if costs(gene).macs <= max_macs:
            return gene
    raise UserError(f"--budget is below the narrowest uniform network's {costs(layout.narrowest()).mmac:.2f} MMac")


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    s = QUICK if args.quick else FULL
    run_dir = Path(args.out or f"runs/fashionmnist_{args.arch}_seed{args.seed}{'_quick' if args.quick else ''}")
    data = ["--dataset", "fashionmnist", "--width-mult", s["width"], "--no-small-input", "--batch-size", s["batch"],
            "--workers", "0", "--seed", str(args.seed), "--val-per-class", s["val_per_class"]]
    data += ["--data-root", str(Path(args.data_root).resolve())] if args.data_root else []
    train = ["--lr", "0.1", "--warmup-epochs", "1", "--steps-per-epoch", s["steps"], "--vis-interval", "10"]
    layout = get_family(args.arch).layout
    costs = cost_model(args.arch, 32, 10, float(s["width"]), False)
    full = costs(layout.full())
    budget_mmac = round(full.macs * args.budget / 1e6, 3)
    times, results = {}, []

    def stage(name: str, fn, argv_: list[str]):
        print(f"\n=== {name}: {' '.join(argv_)}", flush=True)
        t = time.perf_counter()
        with inside(run_dir):
            out = fn(argv_)
        times[name] = time.perf_counter() - t
        return out

    pruning = f"{CHECKPOINT_DIR}/fashionmnist_{args.arch}_pruningnet_best.pth.tar"
    stage("PruningNet", meta_trainer_exp.main, ["--arch", f"{args.arch}_pruningnet", *data, *train,
                                                "--epochs", s["pruning_epochs"], "--valuate",
                                                "--recal-batches", s["recal"]])
    best = stage("search", meta_search_exp.main, [
        "--arch", f"{args.arch}_pruningnet", "--resume", pruning, *data, "--flops", str(budget_mmac),
        "--population", s["population"], "--select-num", s["select"], "--mutation-num", s["mutation"],
        "--crossover-num", s["crossover"], "--epochs", s["iterations"], "--recal-batches", s["recal"]])
    search_ckpt = meta_search_exp.CHECKPOINT_DIR / f"MetaPruneSearch_{args.arch}_pruningnet_flops{budget_mmac}_checkpoint.pth.tar"
    retrain = ["--arch", f"{args.arch}_prunednet", *data, *train, "--epochs", s["retrain_epochs"], "--valuate"]
    searched = stage("retrain searched", meta_trainer_exp.main,
                     [*retrain, "--search-resume", str(search_ckpt), "--candidate", "0", "--suffix", "_searched"])
    uniform = uniform_gene(layout, costs, int(budget_mmac * 1e6))
    baseline = stage("retrain uniform", meta_trainer_exp.main,
                     [*retrain, "--gene", str(layout.format(uniform)), "--suffix", "_uniform"])

    searched_gene = layout.parse(best[0])
    for name, gene, metrics, key in (("searched", searched_gene, searched, "retrain searched"),
                                     ("uniform", uniform, baseline, "retrain uniform")):
        c = costs(gene)
        results.append({"network": name, "gene": layout.format(gene), "top1": round(metrics["top1"], 2),
                        "mmac": round(c.macs / 1e6, 3), "mparams": round(c.params / 1e6, 4),
                        "retrain_s": round(times[key], 1)})
    summary = {"arch": args.arch, "budget": args.budget, "budget_mmac": budget_mmac, "full_mmac": round(full.mmac, 3),
               "seed": args.seed, "quick": args.quick, "pruningnet_s": round(times["PruningNet"], 1),
               "search_s": round(times["search"], 1), "search_best_error": best[0][-1], "results": results}
    with inside(run_dir):
        checkpoint.save_text(json.dumps(summary, indent=1), Path("results.json"))
    print(f"\nFashion-MNIST, {args.arch} x{s['width']}, budget {args.budget:.0%} of {full.mmac:.2f} MMac = "
          f"{budget_mmac} MMac (PruningNet {times['PruningNet']:.0f} s, search {times['search']:.0f} s)")
    print(f"| network | top-1 (%) | MMac | params (M) | retrain (s) |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['network']} | {r['top1']:.2f} | {r['mmac']:.2f} | {r['mparams']:.3f} | {r['retrain_s']:.0f} |")
    print(f"results: {run_dir / 'results.json'}")
    return summary


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
