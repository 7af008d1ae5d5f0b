"""The main job: the whole MetaPruning pipeline, small, on Fashion-MNIST on the CPU.

1. train a PruningNet; 2. search the best gene under a MACs budget (a fraction of the full
network's MACs); 3. retrain that PrunedNet from scratch, and with the same recipe the widest
uniformly-scaled network of no more MACs; 4. print a results table (top-1, MACs, params, wall
time) and write plots. Each stage runs the project's own entry script as a command, with its outputs in
a run folder (``--output-dir runs/fashionmnist_{arch}_seed{seed}``), so every checkpoint and log it
writes can be inspected, resumed, or plotted like those of a hand-run command.

``--quick`` runs the same stages with far fewer steps (a smoke run of about two minutes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from app import checkpoint
from app.config import LOG_SUBDIR, run_files
from models import Gene, GeneLayout, get_family, list_families
from models.cost import CostModel, cost_model
from search.record import search_files
from utils.cli import Parser, ReportedError, UserError, run_script
from utils.files import save_text
from utils.plot import main as plot_main

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """Sizes of one pipeline run. Width 0.25 and the ImageNet stem keep a 2-core CPU step fast
    enough for the whole pipeline in minutes (see README "Results" for what they give)."""

    width: float = 0.25
    batch: int = 256
    pruning_lr: float = 0.05       # PruningNet peak learning rate (0.1 overshoots during warmup)
    lr: float = 0.1                # retraining peak learning rate
    pruning_epochs: int = 4
    retrain_epochs: int = 3
    steps_per_epoch: int = 0       # 0: whole epochs
    population: int = 16
    select: int = 4
    mutation: int = 6
    crossover: int = 6
    iterations: int = 5
    val_per_class: int = 200       # sub-validation images per class that score candidates
    recal_batches: int = 4
    min_fraction: float = 0.0      # searched genes cost at least this fraction of the budget (0: no lower bound)
    sandwich: int | None = None    # PruningNet: --sandwich N (None: one random gene per step, the paper's)
    distill: bool = False          # PruningNet: --distill
    zero_init_residual: bool = False  # retraining: --zero-init-residual


FULL = Recipe()
QUICK = Recipe(width=0.125, batch=128, pruning_epochs=1, retrain_epochs=1, steps_per_epoch=12, population=6,
               select=2, mutation=2, crossover=2, iterations=2, val_per_class=20, recal_batches=2)


class StageFailed(ReportedError):
    """A stage's script stopped; it has said why (one line above): the pipeline exits as it did."""

    def __init__(self, stage: str, status: int) -> None:
        super().__init__(f"the {stage} stage stopped (exit status {status}); its message is above")
        self.exit_status = status


class Pipeline:
    """The stages of one (arch, seed) run in ``run_dir``; each returns what its script returns."""

    def __init__(self, arch: str, seed: int, recipe: Recipe, run_dir: Path, data_root: str | None = None,
                 overwrite: bool = False, cpu: bool = False) -> None:
        self.arch, self.seed, self.r, self.run_dir = arch, seed, recipe, run_dir
        self.layout = get_family(arch).layout
        self.costs = cost_model(arch, 32, 10, recipe.width, False)
        self.data = ["--dataset", "fashionmnist", "--width-mult", str(recipe.width), "--no-small-input",
                     "--batch-size", str(recipe.batch), "--workers", "0", "--seed", str(seed),
                     "--val-per-class", str(recipe.val_per_class)]
        self.data += ["--data-root", str(Path(data_root).resolve())] if data_root else []
        self.data += ["--overwrite"] if overwrite else []
        self.data += ["--cpu"] if cpu else []
        self.train = ["--warmup-epochs", "1", "--steps-per-epoch", str(recipe.steps_per_epoch),
                      "--vis-interval", "10", "--valuate"]
        self.times: dict[str, float] = {}

    def _stage(self, name: str, script: str, argv: list[str]) -> None:
        """Run ``script argv`` as a command writing into the run folder; its exit status is the stage's."""
        argv = [*argv, "--output-dir", str(self.run_dir)]
        print(f"\n=== {name}: {script} {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        status = subprocess.run([sys.executable, str(ROOT / script), *argv], check=False).returncode
        self.times[name] = time.perf_counter() - start
        if status:
            raise StageFailed(name, status)

    def run_checkpoint(self, net: str, suffix: str = "", best: bool = False) -> Path:
        """The resumable (or best) checkpoint ``meta_trainer_exp.py --arch {arch}_{net} --suffix suffix`` writes
        here, named as the script names it."""
        cfg = argparse.Namespace(dataset="fashionmnist", arch=f"{self.arch}_{net}", suffix=suffix,
                                 output_dir=self.run_dir)
        return run_files(cfg)[best]

    @property
    def pruningnet(self) -> Path:
        return self.run_checkpoint("pruningnet", best=True)

    def budget_mmac(self, fraction: float) -> float:
        """``fraction`` of the full network's MACs in MMac, to 4 significant digits (a readable file name)."""
        return float(f"{self.costs(self.layout.full()).macs * fraction / 1e6:.4g}")

    def train_pruningnet(self) -> dict[str, float]:
        """Train the PruningNet; its final probe metrics."""
        self._stage("PruningNet", "meta_trainer_exp.py", [
            "--arch", f"{self.arch}_pruningnet", *self.data, *self.train, "--lr", str(self.r.pruning_lr),
            "--epochs", str(self.r.pruning_epochs), "--recal-batches", str(self.r.recal_batches),
            *(["--sandwich", str(self.r.sandwich)] if self.r.sandwich is not None else []),
            *(["--distill"] if self.r.distill else [])])
        return checkpoint.load(self.run_checkpoint("pruningnet"))["metrics"]

    def search(self, budget_mmac: float) -> list:
        """Candidates (README form, best first) of a search under ``budget_mmac``."""
        r, min_flops = self.r, self._min_flops(budget_mmac)
        bounds = ["--flops", str(budget_mmac), *(["--min-flops", f"{min_flops:g}"] if min_flops else [])]
        self._stage(f"search {budget_mmac}", "meta_search_exp.py", [
            "--arch", f"{self.arch}_pruningnet", "--resume", str(self.pruningnet), *self.data, *bounds,
            "--population", str(r.population), "--select-num", str(r.select), "--mutation-num", str(r.mutation),
            "--crossover-num", str(r.crossover), "--epochs", str(r.iterations), "--recal-batches",
            str(r.recal_batches)])
        return checkpoint.load(self.search_output(budget_mmac), checkpoint.SEARCH)["candidates"]

    def _min_flops(self, budget_mmac: float) -> float | None:
        """``--min-flops`` of a search under ``budget_mmac`` (None: no lower bound), rounded to 4 digits so
        that the value passed and the value the search names its files with are the same."""
        return float(f"{budget_mmac * self.r.min_fraction:.4g}") if self.r.min_fraction else None

    def search_output(self, budget_mmac: float) -> Path:
        """The checkpoint a search under ``budget_mmac`` writes, named as ``meta_search_exp.py`` names it."""
        cfg = argparse.Namespace(arch=f"{self.arch}_pruningnet", flops_name=str(budget_mmac),
                                 min_flops=self._min_flops(budget_mmac), params=None, latency=None,
                                 suffix="", log=None, output_dir=self.run_dir)
        return search_files(cfg).checkpoint

    def retrain(self, gene: Gene, suffix: str, resume: Path | None = None) -> dict[str, float]:
        """Train the PrunedNet of ``gene`` from scratch (or go on with the stopped run of it in ``resume``);
        its final validation metrics."""
        self._stage(f"retrain{suffix}", "meta_trainer_exp.py", [
            "--arch", f"{self.arch}_prunednet", *self.data, *self.train, "--lr", str(self.r.lr),
            "--epochs", str(self.r.retrain_epochs), "--gene", str(self.layout.format(gene)), "--suffix", suffix,
            *(["--zero-init-residual"] if self.r.zero_init_residual else []),
            *(["--resume", str(resume)] if resume else [])])
        return checkpoint.load(self.run_checkpoint("prunednet", suffix))["metrics"]

    def row(self, name: str, gene: Gene, metrics: dict[str, float], stage: str) -> dict:
        c = self.costs(gene)
        return {"network": name, "gene": self.layout.format(gene), "top1": round(metrics["top1"], 2),
                "mmac": round(c.macs / 1e6, 3), "mparams": round(c.params / 1e6, 4),
                "retrain_s": round(self.times[stage], 1)}


def uniform_gene(layout: GeneLayout, costs: CostModel, max_macs: int) -> Gene:
    """The widest gene with one id at every free position whose MACs stay within ``max_macs``."""
    for i in range(30, -1, -1):
        gene = layout.validate([30 if p in layout.fixed else i for p in range(len(layout))])
        if costs(gene).macs <= max_macs:
            return gene
    raise UserError(f"--budget is below the narrowest uniform network's {costs(layout.narrowest()).mmac:.2f} MMac")


def compare(p: Pipeline, fraction: float) -> dict:
    """Search under ``fraction`` of the full MACs, retrain the winner and the uniform network of no more MACs."""
    budget = p.budget_mmac(fraction)
    best = p.search(budget)
    searched, uniform = p.layout.parse(best[0]), uniform_gene(p.layout, p.costs, int(budget * 1e6))
    tag = f"{round(fraction * 100)}"
    rows = [p.row("searched", searched, p.retrain(searched, f"_searched{tag}"), f"retrain_searched{tag}"),
            p.row("uniform", uniform, p.retrain(uniform, f"_uniform{tag}"), f"retrain_uniform{tag}")]
    return {"budget": fraction, "budget_mmac": budget, "search_s": round(p.times[f"search {budget}"], 1),
            "search_best_error": best[0][-1], "results": rows}


def get_args_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.flag("--arch", default="resnet50", choices=list_families())
    p.flag("--budget", type=float, default=0.25, help="MACs budget as a fraction of the full network's")
    p.flag("--seed", type=int, default=0)
    p.flag("--data-root", default=None, help="Fashion-MNIST folder (default: Debian's dataset-fashion-mnist)")
    p.flag("--quick", action="store_true", help="a smoke run of the same stages in about two minutes")
    p.flag("--out", default=None, help="run folder (default runs/fashionmnist_{arch}_seed{seed}[_quick])")
    p.flag("--overwrite", action="store_true", help="run again in a run folder that holds an earlier run")
    p.flag("--cpu", action="store_true", help="run every stage on the CPU even where a GPU is visible")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the stages and print the results table; the summary written to ``results.json``."""
    args = get_args_parser().parse_args(argv)
    if not 0 < args.budget <= 1:
        raise UserError(f"--budget is a fraction of the full network's MACs in (0, 1], got {args.budget}")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    run_dir = Path(args.out or f"runs/fashionmnist_{args.arch}_seed{args.seed}{'_quick' if args.quick else ''}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file; give a folder for the run")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not args.overwrite:
        raise UserError(f"{run_dir} holds an earlier run; pass --overwrite to run again there, or --out DIR for "
                        f"another folder")
    p = Pipeline(args.arch, args.seed, QUICK if args.quick else FULL, run_dir, args.data_root, args.overwrite,
                 args.cpu)
    uniform_gene(p.layout, p.costs, int(p.budget_mmac(args.budget) * 1e6))  # a budget no gene meets stops here
    p.train_pruningnet()
    result = compare(p, args.budget)
    summary = {"arch": args.arch, "seed": args.seed, "quick": args.quick, "recipe": asdict(p.r),
               "full_mmac": round(p.costs(p.layout.full()).mmac, 3), "pruningnet_s": round(p.times["PruningNet"], 1),
               **result}
    save_text(json.dumps(summary, indent=1), run_dir / "results.json")
    logs = run_dir / LOG_SUBDIR
    plot_main([str(logs / f"fashionmnist_{args.arch}_pruningnet.jsonl"),
               str(logs / f"MetaPruneSearch_{args.arch}_pruningnet_flops{result['budget_mmac']}.jsonl"),
               "--out", str(run_dir / "plots")])
    print(f"\nFashion-MNIST, {args.arch} x{p.r.width}, budget {args.budget:.0%} of {summary['full_mmac']:.2f} MMac "
          f"= {result['budget_mmac']} MMac (PruningNet {summary['pruningnet_s']:.0f} s, "
          f"search {result['search_s']:.0f} s)")
    print("| network | top-1 (%) | MMac | params (M) | retrain (s) |\n|---|---|---|---|---|")
    for r in result["results"]:
        print(f"| {r['network']} | {r['top1']:.2f} | {r['mmac']:.2f} | {r['mparams']:.3f} | {r['retrain_s']:.0f} |")
    print(f"results: {run_dir / 'results.json'}, plots: {run_dir / 'plots'}")
    return summary


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
