"""Small-scale reproduction of MetaPruning's two claims on Fashion-MNIST (CPU).

1. At equal MACs, the searched per-layer widths beat uniformly scaled widths: for each budget and
   seed, a PruningNet is trained, the search picks a gene, and it is retrained from scratch beside
   the widest uniform network of no more MACs, with the same recipe (``pipeline.py``'s stages).
2. The PruningNet ranks candidates like training them would: Kendall's tau between the top-1 the
   PruningNet gives a gene (generated weights, recalibrated BN, sub-validation split) and the top-1
   of that gene trained from scratch, for genes spread over the budget range.

Run: ``.venv/bin/python benchmarks/reproduce.py [--arch resnet50] [--seeds 0 1 2] [--budgets 0.25 0.5]
[--tau-genes 12] [--quick]``. Runs go to ``runs/reproduce/``; the result to ``--out`` (default
``benchmarks/results/``): ``reproduce_{arch}{tag}.json``, a markdown summary ``reproduce_{arch}{tag}.md`` and
the tau plot ``reproduce_{arch}{tag}_tau.png``. Nothing in ``docs/`` is written: the write-up there is by hand.

Trying a fix: ``--pruning-epochs``, ``--recal-batches``, ``--iterations`` and ``--min-fraction``
change the PruningNet's and the search's side of the recipe, and ``--tag`` names the variant (its own
run folder and result files). ``--reuse FILE`` takes the from-scratch results of
an earlier run's JSON instead of retraining them (retraining depends on the gene, the seed and the
retraining recipe, not on the PruningNet), and its tau genes, so the variant's proxy is compared on the
same genes against the same ground truth. ``--pruningnets DIR`` takes each seed's trained PruningNet
from an earlier run folder (``DIR/seed{seed}``) instead of training it again.

The PruningNet's training rule: ``--sandwich N`` and ``--distill`` (``meta_trainer_exp.py``'s flags).
The evaluation: ``--retrain-epochs``; per budget the paired t-test and the exact Wilcoxon signed-rank
p-value of searched − uniform over the seeds (both retrained with the same seed); and
``--budget-tau-genes N``: Kendall's tau over N random genes within ``--within`` (default ±10%) of each
budget's MACs, the genes the search chooses between, retrained with the first seed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from app import checkpoint
from app.config import SPLIT_SUBDIR
from benchmarks.stats import kendall_tau, paired_t_p, wilcoxon_p
from data import get_data
from models import Gene, list_families
from models.gene import NUM_SCALES
from pipeline import FULL, QUICK, Pipeline, Recipe, compare
from search.evaluator import search_evaluator
from utils.cli import UserError
from utils.files import save_text

ROOT = Path(__file__).resolve().parent.parent

# The main job's recipe, scaled up where the 15-minute limit made it thin: the PruningNet trained one
# epoch longer, a 2.5x larger sub-validation split and a 2x larger recalibration set (a less noisy
# proxy), a search of 144 instead of 80 candidates, and retraining one epoch longer (less noise between
# retrained networks). Sized so that 3 seeds x 2 budgets and 12 tau genes take under two hours here.
REPRO = replace(FULL, pruning_epochs=5, retrain_epochs=4, val_per_class=500, recal_batches=8, population=24,
                select=6, mutation=9, crossover=9, iterations=6)


# What a from-scratch result depends on besides the gene and the seed.
RETRAIN_FIELDS = ("width", "batch", "lr", "retrain_epochs", "steps_per_epoch", "val_per_class", "zero_init_residual")


class ReusingPipeline(Pipeline):
    """A Pipeline that returns an earlier run's from-scratch result for a (seed, gene) it holds."""

    def __init__(self, *args, done: dict[tuple, dict], pruningnets: Path | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.done, self.pruningnets = done, pruningnets

    def train_pruningnet(self) -> dict[str, float]:
        """Train the PruningNet, or copy the one an earlier run trained with this recipe and seed."""
        if self.pruningnets is None:
            return super().train_pruningnet()
        src = self.pruningnets / f"seed{self.seed}" / self.pruningnet.relative_to(self.run_dir)
        last = src.with_name(src.name.replace("_best", "_checkpoint"))
        try:
            state, finished = (checkpoint.load(path, "model", "--pruningnets") for path in (src, last))
        except UserError as e:
            raise ValueError(str(e)) from None
        r, config = self.r, state["config"]
        want = {"arch": f"{self.arch}_pruningnet", "epochs": r.pruning_epochs, "lr": r.pruning_lr,
                "width_mult": r.width, "batch_size": r.batch, "seed": self.seed, "val_per_class": r.val_per_class,
                "steps_per_epoch": r.steps_per_epoch, "sandwich": r.sandwich, "distill": r.distill}
        config = {"sandwich": None, "distill": False, **config}  # PruningNets trained before those flags
        differ = [k for k, v in want.items() if config.get(k) != v]
        if differ:
            raise ValueError(f"--pruningnets {src}: trained with another recipe ({', '.join(differ)})")
        if finished["epoch"] != r.pruning_epochs:  # _best may come from an earlier epoch: the last one tells
            raise ValueError(f"--pruningnets {last}: unfinished, at epoch {finished['epoch']} of {r.pruning_epochs}")
        checkpoint.copy(src, self.pruningnet)
        self.times["PruningNet"] = 0.0
        return state["metrics"]

    def retrain(self, gene: Gene, suffix: str) -> dict[str, float]:
        hit = self.done.get((self.seed, tuple(self.layout.format(gene))))
        if hit is None:
            return super().retrain(gene, suffix)
        self.times[f"retrain{suffix}"] = hit.get("retrain_s", 0.0)
        return {"top1": hit["top1"]}


def check_retrain_recipe(path: Path, old_recipe: dict, recipe: Recipe) -> None:
    """ValueError unless the results of ``path``, retrained with ``old_recipe`` (a JSON's ``recipe``; fields
    added since take their defaults), were retrained as ``recipe`` retrains."""
    was = {**asdict(Recipe()), **old_recipe}
    differ = [f for f in RETRAIN_FIELDS if was[f] != getattr(recipe, f)]
    if differ:
        raise ValueError(f"--reuse {path}: its retraining recipe differs in {', '.join(differ)}; reuse a run "
                         "retrained with this recipe")


def earlier_results(path: Path, recipe: Recipe) -> tuple[dict[tuple, dict], int, list[list[int]]]:
    """An earlier run's from-scratch results by (seed, gene), the seed of its tau genes and those genes
    (distinct, extra genes added to its JSON included). ValueError when it cannot be reused."""
    try:
        old = json.loads(path.read_text())
        old_recipe = old["recipe"]
        done = {(c["seed"], tuple(r["gene"])): r for c in old["comparisons"] for r in c["results"]}
        tau_seed, rows = old["comparisons"][0]["seed"], old["tau_genes"] + old.get("tau_extra_genes", [])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"--reuse {path}: not a readable reproduce JSON ({type(e).__name__}: {e})")
    check_retrain_recipe(path, old_recipe, recipe)
    tau_genes = []
    for r in rows:
        if r["gene"] not in tau_genes:
            tau_genes.append(r["gene"])
            done.setdefault((tau_seed, tuple(r["gene"])), {"top1": r["scratch_top1"]})
    for band in old.get("within_budget_tau", {}).values():  # retrained with the tau seed too
        for r in band["genes"]:
            done.setdefault((tau_seed, tuple(r["gene"])), {"top1": r["scratch_top1"]})
    return done, tau_seed, tau_genes


def pool_gene(p: Pipeline, rng: random.Random) -> Gene:
    """A random gene whose free ids lie in a random id range: uniform genes reach neither end of the
    MACs range, genes of a random range reach both."""
    return p.layout.sample(rng, *sorted((rng.randrange(NUM_SCALES), rng.randrange(NUM_SCALES))))


def spread_genes(p: Pipeline, n: int, low: float, high: float, seed: int) -> list:
    """``n`` distinct random genes whose MACs spread evenly over [low, high] of the full network's.

    Uniform genes crowd around half the full MACs, so each pool gene draws its ids uniformly from a
    random sub-range of 0..30: the pool then covers every cost from the narrowest to the full gene.
    """
    rng, full = random.Random(seed), p.costs(p.layout.full()).macs
    macs = {}
    for _ in range(20000):
        g = pool_gene(p, rng)
        macs[g] = p.costs(g).macs
    picked = []
    for k in range(n):
        target = (low + (high - low) * (k + 0.5) / n) * full
        picked.append(min((g for g in macs if g not in picked), key=lambda g: abs(macs[g] - target)))
    return picked


def proxy_scores(p: Pipeline, genes: list, recal_batches: int) -> list[float]:
    """The top-1 the PruningNet gives each gene, exactly as the search scores candidates."""
    net = checkpoint.build_model(checkpoint.load(p.pruningnet))
    data = get_data("fashionmnist", None, 32, p.r.val_per_class, hold_out=True, seed=p.seed,
                    split_dir=p.run_dir / SPLIT_SUBDIR)
    evaluator = search_evaluator(net, data, recal_batches, p.r.batch, p.seed, torch.device("cpu"))
    return [evaluator.top1(g) for g in genes]


def budget_genes(p: Pipeline, fraction: float, n: int, within: float, seed: int) -> list:
    """``n`` distinct random genes whose MACs are within ``within`` (a fraction) of the budget of
    ``fraction`` of the full MACs: the genes a search under that budget chooses between."""
    rng, budget = random.Random(seed), fraction * p.costs(p.layout.full()).macs
    picked: list = []
    for _ in range(200000):
        g = pool_gene(p, rng)
        if g not in picked and abs(p.costs(g).macs / budget - 1) <= within:
            picked.append(g)
            if len(picked) == n:
                return picked
    raise ValueError(f"found {len(picked)} of {n} genes within {within:.0%} of {fraction:.0%} of the full MACs")


def within_budget_tau(p: Pipeline, fractions: list[float], n: int, within: float) -> dict[str, dict]:
    """Per budget: genes within ``within`` of its MACs, their PruningNet scores and from-scratch top-1,
    and Kendall's tau between the two."""
    out = {}
    for fraction in fractions:
        genes = budget_genes(p, fraction, n, within, seed=round(fraction * 1000))
        proxy = proxy_scores(p, genes, p.r.recal_batches)
        rows = [{"gene": p.layout.format(g), "mmac": round(p.costs(g).macs / 1e6, 3), "proxy_top1": round(s, 2),
                 "scratch_top1": round(p.retrain(g, f"_budget{round(fraction * 100)}_{k:02d}")["top1"], 2)}
                for k, (g, s) in enumerate(zip(genes, proxy))]
        tau = kendall_tau([r["proxy_top1"] for r in rows], [r["scratch_top1"] for r in rows])
        out[f"{fraction:g}"] = {"within": within, "tau": tau, "genes": rows}
    return out


def proxy_quality(p: Pipeline, genes: list, recals: list[int] | None) -> tuple[list[dict], dict, dict]:
    """Each gene's PruningNet score (at the recipe's and the ``recals`` recalibration sizes) and
    from-scratch top-1; Kendall's tau by recalibration size, and over each half of the MACs range."""
    recals = recals or [p.r.recal_batches, 4 * p.r.recal_batches]
    proxy = {n: proxy_scores(p, genes, n) for n in dict.fromkeys([p.r.recal_batches, *recals])}
    rows = []
    for i, g in enumerate(genes):
        scratch = p.retrain(g, f"_tau{i:02d}")
        rows.append({"gene": p.layout.format(g), "mmac": round(p.costs(g).macs / 1e6, 3),
                     "proxy_top1": round(proxy[p.r.recal_batches][i], 2),
                     **{f"proxy_top1_recal{n}": round(v[i], 2) for n, v in proxy.items()},
                     "scratch_top1": round(scratch["top1"], 2)})
    scratch = [r["scratch_top1"] for r in rows]
    by_recal = {n: kendall_tau([r[f"proxy_top1_recal{n}"] for r in rows], scratch) for n in proxy}
    # Budgets of 25% and 50% lie in the lower half of the MACs range: how well are genes ranked there?
    half = p.costs(p.layout.full()).macs / 2e6
    by_half = {side: kendall_tau([r["proxy_top1"] for r in part], [r["scratch_top1"] for r in part])
               for side, part in (("lower", [r for r in rows if r["mmac"] <= half]),
                                  ("upper", [r for r in rows if r["mmac"] > half]))}
    return rows, by_recal, by_half


def check_tag(ap: argparse.ArgumentParser, tag: str) -> None:
    """Stop with one line when ``--tag`` (a part of result file names) holds anything but a file name's letters."""
    if not re.fullmatch(r"[\w.-]*", tag):
        ap.error(f"--tag {tag!r}: use letters, digits, '_', '.' and '-' only (it is part of a file name)")


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"


def plot(tau_rows: list[dict], tau: float, out: Path) -> None:
    from matplotlib.figure import Figure

    from utils.plot import save as save_png

    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    sc = ax.scatter([r["proxy_top1"] for r in tau_rows], [r["scratch_top1"] for r in tau_rows],
                    c=[r["mmac"] for r in tau_rows], cmap="viridis")
    fig.colorbar(sc, ax=ax, label="MMac")
    ax.set_xlabel("PruningNet top-1 (%), sub-validation split")
    ax.set_ylabel("trained from scratch top-1 (%), test set")
    ax.set_title(f"proxy quality: Kendall tau = {tau:.2f} ({len(tau_rows)} genes)")
    fig.tight_layout()
    save_png(fig, out, 110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50", choices=list_families())
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5], help="none: the tau genes only")
    ap.add_argument("--tau-genes", type=int, default=12, help="0: no proxy-quality stage")
    ap.add_argument("--pruning-epochs", type=int, help=f"PruningNet epochs (recipe: {REPRO.pruning_epochs})")
    ap.add_argument("--recal-batches", type=int, help=f"BN recalibration batches (recipe: {REPRO.recal_batches})")
    ap.add_argument("--iterations", type=int, help=f"search iterations (recipe: {REPRO.iterations})")
    ap.add_argument("--min-fraction", type=float,
                    help="searched genes cost at least this fraction of the budget (recipe: no lower bound)")
    ap.add_argument("--tau-recal", type=int, nargs="+",
                    help="recalibration sizes the tau genes are also scored with (default: the recipe's and 4x)")
    ap.add_argument("--tag", default="", help="names a variant: runs/reproduce/{arch}{tag}, reproduce_{arch}{tag}.json")
    ap.add_argument("--reuse", type=Path, help="an earlier run's JSON: its from-scratch results and tau genes")
    ap.add_argument("--pruningnets", type=Path, help="an earlier run folder: its trained PruningNets")
    ap.add_argument("--sandwich", type=int, help="PruningNet: --sandwich N (the widest, the narrowest, N random genes)")
    ap.add_argument("--distill", action="store_true", help="PruningNet: in-place distillation (needs --sandwich)")
    ap.add_argument("--retrain-epochs", type=int, help=f"retraining epochs (recipe: {REPRO.retrain_epochs})")
    ap.add_argument("--zero-init-residual", action="store_true", help="retraining: meta_trainer_exp.py's flag")
    ap.add_argument("--budget-tau-genes", type=int, default=0,
                    help="per budget, genes within --within of its MACs whose PruningNet ranking is measured")
    ap.add_argument("--within", type=float, default=0.1, help="how near the budget those genes' MACs are")
    ap.add_argument("--quick", action="store_true", help="tiny recipe: checks the machinery, not the claims")
    ap.add_argument("--data-root", help="Fashion-MNIST folder (default: Debian's dataset-fashion-mnist)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="folder of the result: its JSON, markdown summary and tau plot")
    args = ap.parse_args()
    check_tag(ap, args.tag)
    recipe, start = (QUICK if args.quick else REPRO), time.perf_counter()
    recipe = replace(recipe, pruning_epochs=args.pruning_epochs or recipe.pruning_epochs,
                     recal_batches=args.recal_batches or recipe.recal_batches,
                     iterations=args.iterations or recipe.iterations, min_fraction=args.min_fraction or 0.0,
                     retrain_epochs=args.retrain_epochs or recipe.retrain_epochs, sandwich=args.sandwich,
                     distill=args.distill, zero_init_residual=args.zero_init_residual)
    tag = args.tag + ("_quick" if args.quick else "")
    stem = f"reproduce_{args.arch}{tag}"
    if recipe != REPRO and not tag:
        ap.error("a changed recipe needs --tag (the reproduction's own results are not to be overwritten)")
    try:
        done, tau_seed, reused_genes = earlier_results(args.reuse, recipe) if args.reuse else ({}, args.seeds[0], [])
    except ValueError as e:
        ap.error(str(e))
    if tau_seed not in args.seeds:
        ap.error(f"--reuse {args.reuse}: its tau genes were retrained with seed {tau_seed}; include it in --seeds")
    base = Path("runs/reproduce") / f"{args.arch}{tag}"
    comparisons, pipes = [], {}
    for seed in args.seeds:
        p = pipes[seed] = ReusingPipeline(args.arch, seed, recipe, base / f"seed{seed}", args.data_root, done=done,
                                          pruningnets=args.pruningnets, cpu=True)
        try:
            p.train_pruningnet()
        except ValueError as e:
            ap.error(str(e))
        for fraction in args.budgets:
            comparisons.append({"seed": seed, **compare(p, fraction)})
    for c in comparisons:
        for r in c["results"]:
            r["reused"] = (c["seed"], tuple(r["gene"])) in done
    p = pipes[tau_seed]
    genes = [p.layout.parse(g) for g in reused_genes] or spread_genes(p, args.tau_genes, 0.15, 0.9, seed=1)
    tau_rows, tau_by_recal, tau_by_half = proxy_quality(p, genes, args.tau_recal) if genes else ([], {}, {})
    tau = tau_by_recal.get(recipe.recal_batches)
    near = within_budget_tau(p, args.budgets, args.budget_tau_genes, args.within) if args.budget_tau_genes else {}

    lines = [f"## Small-scale reproduction ({args.arch}, Fashion-MNIST, CPU)", "",
             f"Command: `.venv/bin/python {' '.join(sys.argv)}` ({(time.perf_counter() - start) / 3600:.1f} h on "
             f"this 2-core machine). Recipe: {json.dumps(asdict(recipe))}.", "",
             "| budget (MACs) | searched top-1 (%) | uniform top-1 (%) | searched − uniform | seeds | paired t p | "
             "Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    summary = []
    for fraction in args.budgets:
        rows = [c for c in comparisons if c["budget"] == fraction]
        s = [next(r["top1"] for r in c["results"] if r["network"] == "searched") for c in rows]
        u = [next(r["top1"] for r in c["results"] if r["network"] == "uniform") for c in rows]
        d = [a - b for a, b in zip(s, u)]  # paired: searched and uniform retrained with the same seed
        t_p, w_p = (paired_t_p(d), wilcoxon_p(d)) if len(d) > 1 else (None, None)
        summary.append({"budget": fraction, "searched": s, "uniform": u, "difference": d, "paired_t_p": t_p,
                        "wilcoxon_p": w_p, "uniform_spread": max(u) - min(u)})
        lines.append(f"| {fraction:.0%} ({rows[0]['budget_mmac']} MMac) | {mean_std(s)} | {mean_std(u)} | "
                     f"{mean_std(d)} | {len(rows)} | {t_p if t_p is None else f'{t_p:.3f}'} | "
                     f"{w_p if w_p is None else f'{w_p:.3f}'} |")
    if tau_rows:
        lines += ["", f"Kendall tau between PruningNet top-1 and from-scratch top-1 over {len(tau_rows)} genes "
                  f"(15–90% of the full MACs, seed {tau_seed}): **{tau:.3f}**; by recalibration batches: "
                  f"{', '.join(f'{n}: {t:.3f}' for n, t in tau_by_recal.items())}; over the genes of at most / "
                  f"more than half the full MACs: {tau_by_half['lower']:.3f} / {tau_by_half['upper']:.3f}", "",
                  f"![proxy vs from-scratch top-1]({stem}_tau.png)", ""]
    for fraction, t in near.items():
        lines.append(f"Kendall tau over {len(t['genes'])} genes within ±{t['within']:.0%} of the "
                     f"{float(fraction):.0%} budget (seed {tau_seed}): **{t['tau']:.3f}**")
    result = {"arch": args.arch, "command": " ".join(sys.argv), "recipe": asdict(recipe), "summary": summary,
              "comparisons": comparisons, "tau": tau, "tau_by_recal": tau_by_recal,
              "tau_by_half": tau_by_half, "tau_genes": tau_rows, "within_budget_tau": near,
              "reused_from": str(args.reuse) if args.reuse else None,
              "hours": round((time.perf_counter() - start) / 3600, 2)}
    save_text(json.dumps(result, indent=1), args.out / f"{stem}.json")
    save_text("\n".join(lines) + "\n", args.out / f"{stem}.md")
    if tau_rows:
        plot(tau_rows, tau, args.out / f"{stem}_tau.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
