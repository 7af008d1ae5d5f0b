"""How much one gene's retrained top-1 moves with the seed (the noise floor of every searched-vs-uniform
comparison), and searched against uniform over paired seeds.

Per budget, the uniform gene (the widest uniform network within it, as the comparison uses) is trained
from scratch with the reproduction's retraining recipe once per seed. ``--pruningnets DIR [DIR ...]``
adds, per folder (a run folder in which ``benchmarks/reproduce.py`` or ``pipeline.py`` trained a
PruningNet with seed ``--pruningnet-seed``, e.g. ``runs/reproduce/resnet50_pn15/seed0``): the search
under each budget, run there once, and its best gene retrained with the same seeds as the uniform one;
per budget and folder, searched − uniform over the seeds with the paired t-test and the exact Wilcoxon
signed-rank p-value. This holds one PruningNet and one search fixed and varies the retraining: it tells
whether that searched gene beats the uniform one, not how much the search varies between PruningNets.
``--budget-tau-genes N``: per budget, N random genes within ``--within`` (default ±10%) of its MACs, the
genes the search chooses between, retrained with the first seed; per folder, Kendall's tau between its
PruningNet's score of them (as the search scores) and their top-1; ``--budget-tau-from JSON`` takes those
genes and their top-1 from a ``benchmarks/reproduce.py`` run instead (retrained with its recipe). ``--rank-only``:
the searches and the within-budget tau only, nothing retrained (the genes' top-1 from ``--reuse``): a new
PruningNet's choices and ranking against the ground truth of earlier runs, in minutes instead of hours.
``--searched-from JSON [JSON ...]``: the searched genes an earlier run of this script recorded (e.g. a
``--rank-only`` one), retrained with the seeds as if searched here, without their PruningNets (whose files are
not committed, and which another machine type would train into other ones); each row keeps that run's
``pruningnet`` and ``within_budget_tau`` and names the file (``searched_in``).

Run: ``.venv/bin/python benchmarks/retrain_spread.py [--budgets 0.25] [--seeds 0 1 2 3 4]
[--retrain-epochs 12] [--zero-init-residual] [--pruningnets DIR ...] [--budget-tau-genes 8] [--jobs 2]
[--reuse JSON ...] [--rank-only] [--searched-from JSON ...] [--tag _b50]``. Runs go to ``runs/retrain_spread/``; a retraining finished there earlier is read
back, not run again, and ``--reuse`` takes the (gene, seed) results of earlier runs' JSONs, retrained with the same
recipe (a run folder that is gone, or another machine's); the scores their PruningNets gave the same within-budget
genes give those PruningNets' tau against this run's top-1 of them (``earlier_pruningnets_tau``). The result:
``benchmarks/results/retrain_spread_{arch}_e{epochs}[_zi]{tag}.json``; each searched gene's row says how its
PruningNet was trained (``pruningnet``: epochs, sandwich, distill, ...), read from that PruningNet's checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from app import checkpoint
from benchmarks.reproduce import REPRO, budget_genes, check_retrain_recipe, check_tag, proxy_scores
from benchmarks.stats import kendall_tau, paired_t_p, wilcoxon_p
from benchmarks.throughput import save_result
from models import Gene, GeneLayout, list_families
from pipeline import Pipeline, Recipe, uniform_gene
from utils.cli import UserError

ROOT = Path(__file__).resolve().parent.parent
# The flags that make one PruningNet another: a result names how its PruningNets were trained, not only their
# folders (the retraining recipe it also records says nothing of them).
PRUNINGNET_FIELDS = ("epochs", "lr", "sandwich", "distill", "seed", "width_mult", "batch_size")


def retrained(p: Pipeline, gene: Gene, suffix: str, done: dict[tuple, dict] | None = None) -> dict:
    """``gene`` trained from scratch in ``p``'s run folder, or read back (``retrain_s`` None) when a finished
    run of it is there or ``done`` holds its result by (seed, gene); a stopped run of it there goes on from its
    last epoch (``retrain_s`` the time of what was left)."""
    hit = (done or {}).get((p.seed, tuple(p.layout.format(gene))))
    if hit is not None:
        return {**hit, "retrain_s": None}
    path = p.run_checkpoint("prunednet", suffix)
    state = checkpoint.load(path) if path.is_file() else None
    same = state is not None and tuple(state["gene"]) == tuple(gene)
    if same and state["epoch"] == p.r.retrain_epochs:
        return {"seed": p.seed, "top1": round(state["metrics"]["top1"], 2), "retrain_s": None}  # read back
    start = time.perf_counter()
    top1 = p.retrain(gene, suffix, resume=path if same else None)["top1"]
    return {"seed": p.seed, "top1": round(top1, 2), "retrain_s": round(time.perf_counter() - start, 1)}


def searched_gene(p: Pipeline, fraction: float) -> Gene:
    """The best gene of the search under ``fraction`` of the full MACs with the PruningNet of ``p``'s run folder
    (searched there unless a finished search is there already)."""
    budget = p.budget_mmac(fraction)
    found = p.search_output(budget)
    candidates = checkpoint.load(found, checkpoint.SEARCH)["candidates"] if found.is_file() else p.search(budget)
    return p.layout.parse(candidates[0])


def pruningnet_recipe(p: Pipeline) -> dict:
    """How the PruningNet of ``p``'s run folder was trained (``PRUNINGNET_FIELDS`` of its checkpoint's config).
    ``UserError`` when the folder holds no readable PruningNet."""
    config = checkpoint.load(p.pruningnet, "model", "--pruningnets", mmap=True).get("config", {})
    return {"sandwich": None, "distill": False, **{k: config[k] for k in PRUNINGNET_FIELDS if k in config}}


def earlier_spread(path: Path, recipe: Recipe) -> dict[tuple, dict]:
    """The from-scratch results of an earlier run's JSON by (seed, gene): its uniform and searched genes'
    runs and the within-budget genes it retrained. ValueError when they were retrained with another recipe."""
    try:
        old = json.loads(path.read_text())
        old_recipe = old["recipe"]
        done = {}
        for b in old["budgets"]:
            for row in [b, *b["searched"].values()]:
                done.update({(r["seed"], tuple(row["gene"])): r for r in row["runs"]})
            for row in b["searched"].values():
                tau = row.get("within_budget_tau", {})
                if tau.get("scratch", "").startswith("seed "):  # retrained here, not read from another JSON
                    seed = int(tau["scratch"].split()[1])
                    done.update({(seed, tuple(g["gene"])): {"seed": seed, "top1": g["scratch_top1"]}
                                 for g in tau["genes"]})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--reuse {path}: not a readable retrain_spread JSON ({type(e).__name__}: {e})") from None
    check_retrain_recipe(path, old_recipe, recipe)
    return done


def earlier_scores(paths: list[Path], fraction: float) -> dict[str, dict[tuple, float]]:
    """Per PruningNet of the ``--reuse`` JSONs (read by ``earlier_spread``), its score of each within-budget gene
    of ``fraction`` it scored: its tau can then be taken against this run's top-1 of the same genes."""
    scores: dict[str, dict[tuple, float]] = {}
    for path in paths:
        for b in json.loads(path.read_text())["budgets"]:
            if b["budget"] == fraction:
                for label, row in b["searched"].items():
                    genes = row.get("within_budget_tau", {}).get("genes", [])
                    scores.setdefault(label, {}).update({tuple(g["gene"]): g["proxy_top1"] for g in genes})
    return scores


def earlier_searched(paths: list[Path], fraction: float, layout: GeneLayout) -> dict[str, dict]:
    """The searched genes of ``fraction`` that earlier runs' JSONs recorded, by PruningNet label: each their row
    (``gene`` parsed with ``layout``, ``pruningnet`` when recorded, ``within_budget_tau`` when measured) and
    ``searched_in``, its file. ValueError when a file cannot be read, holds another family's gene, or two give
    one label."""
    found: dict[str, dict] = {}
    for path in paths:
        try:
            rows = [(label, row) for b in json.loads(path.read_text())["budgets"] if b["budget"] == fraction
                    for label, row in b["searched"].items()]
            picked = {label: {"gene": layout.parse(row["gene"]), "searched_in": str(path),
                              **{k: row[k] for k in ("pruningnet", "within_budget_tau") if k in row}}
                      for label, row in rows}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"--searched-from {path}: not a readable retrain_spread JSON "
                             f"({type(e).__name__}: {e})") from None
        if twice := sorted(found.keys() & picked.keys()):
            raise ValueError(f"--searched-from {path}: {', '.join(twice)} at {fraction:g} is in an earlier file too; "
                             "give each searched gene once")
        found.update(picked)
    return found


def earlier_band(path: Path, fraction: float, p: Pipeline) -> tuple[list[Gene], list[float]]:
    """The within-budget genes of ``fraction`` in a reproduce JSON and their from-scratch top-1 (none when it
    measured no tau at that budget). ValueError when the file cannot be read."""
    try:
        bands = json.loads(path.read_text())["within_budget_tau"]
        rows = bands[f"{fraction:g}"]["genes"] if f"{fraction:g}" in bands else []
        return [p.layout.parse(r["gene"]) for r in rows], [r["scratch_top1"] for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--budget-tau-from {path}: not a reproduce JSON with within-budget genes "
                         f"({type(e).__name__}: {e})") from None


def run_suffix(label: str, pct: int) -> str:
    """The retraining's --suffix: ``_uniform25``, or ``_{PruningNet folder}_25`` for a searched gene."""
    return f"_{label}{pct}" if label == "uniform" else f"_{label}_{pct}"


def summarize(gene: list[int], mmac: float, runs: list[dict]) -> dict:
    if not runs:  # --rank-only
        return {"gene": gene, "mmac": mmac, "runs": []}
    top1s = [r["top1"] for r in runs]
    return {"gene": gene, "mmac": mmac, "runs": runs, "mean": round(statistics.mean(top1s), 2),
            "std": round(statistics.stdev(top1s), 2) if len(top1s) > 1 else 0.0,
            "spread": round(max(top1s) - min(top1s), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50", choices=list_families())
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--retrain-epochs", type=int, default=REPRO.retrain_epochs)
    ap.add_argument("--zero-init-residual", action="store_true", help="retraining: meta_trainer_exp.py's flag")
    ap.add_argument("--pruningnets", type=Path, nargs="*", default=[],
                    help="run folders holding a trained PruningNet: their searched genes against the uniform one")
    ap.add_argument("--pruningnet-seed", type=int, default=0, help="the seed those PruningNets were trained with")
    ap.add_argument("--budget-tau-genes", type=int, default=0,
                    help="per budget, genes within --within of its MACs retrained with the first seed: Kendall's tau "
                         "between each PruningNet's score of them and their top-1")
    ap.add_argument("--within", type=float, default=0.1, help="how near the budget those genes' MACs are")
    ap.add_argument("--budget-tau-from", type=Path,
                    help="a benchmarks/reproduce.py JSON: its within-budget genes and their from-scratch top-1 (with "
                         "its retraining recipe) instead of retraining --budget-tau-genes")
    ap.add_argument("--jobs", type=int, default=1, help="retrainings at a time, each on cores/jobs threads")
    ap.add_argument("--reuse", type=Path, nargs="+", default=[],
                    help="earlier retrain_spread JSONs of this retraining recipe: their results by (seed, gene) "
                         "instead of retraining them")
    ap.add_argument("--rank-only", action="store_true",
                    help="search and measure the within-budget tau only; the within-budget genes' top-1 (first seed) "
                         "from --reuse or --budget-tau-from, nothing retrained")
    ap.add_argument("--searched-from", type=Path, nargs="+", default=[],
                    help="earlier retrain_spread JSONs: their searched genes retrained with the seeds, without their "
                         "PruningNets")
    ap.add_argument("--tag", default="", help="appended to the result's file name (a run of other budgets or seeds)")
    args = ap.parse_args()
    check_tag(ap, args.tag)
    for d in args.pruningnets:
        if not (d / "checkpoints").is_dir():
            ap.error(f"--pruningnets {d}: not a run folder (no checkpoints/ in it)")
    # a PruningNet is named by its variant's folder (runs/reproduce/{variant}/seed0), which names its retrainings
    searchers = {d.parent.name: Pipeline(args.arch, args.pruningnet_seed, REPRO, d, cpu=True) for d in args.pruningnets}
    if len(searchers) < len(args.pruningnets):
        ap.error("--pruningnets: two folders of one variant name; give each variant its own folder")
    try:
        trained_as = {label: pruningnet_recipe(p) for label, p in searchers.items()}
    except UserError as e:
        ap.error(str(e))
    if args.jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    recipe = replace(REPRO, retrain_epochs=args.retrain_epochs, zero_init_residual=args.zero_init_residual)
    name = f"{args.arch}_e{recipe.retrain_epochs}{'_zi' if recipe.zero_init_residual else ''}"
    base = ROOT / "runs" / "retrain_spread" / name
    pipes = {seed: Pipeline(args.arch, seed, recipe, base / f"seed{seed}", cpu=True) for seed in args.seeds}
    p0 = pipes[args.seeds[0]]
    try:
        done = {k: v for path in args.reuse for k, v in earlier_spread(path, recipe).items()}
        bands = {f: earlier_band(args.budget_tau_from, f, p0) for f in args.budgets} if args.budget_tau_from else {}
        recorded = {f: earlier_searched(args.searched_from, f, p0.layout) for f in args.budgets}
    except ValueError as e:
        ap.error(str(e))
    if args.searched_from and not any(recorded.values()):
        ap.error(f"--searched-from: no searched gene of the budgets {' '.join(f'{f:g}' for f in args.budgets)} in "
                 "those files; give a budget they searched")
    if clash := sorted({label for rows in recorded.values() for label in rows} & searchers.keys()):
        ap.error(f"--searched-from and --pruningnets both give {', '.join(clash)}; give each PruningNet once")
    budgets = []
    for fraction in args.budgets:
        pct = round(fraction * 100)
        near, scratch = bands.get(fraction, ([], []))
        if args.budget_tau_from and not near:
            print(f"budget {fraction:.0%}: {args.budget_tau_from} has no within-budget genes of it; no tau there")
        if args.budget_tau_genes and not args.budget_tau_from:
            near = budget_genes(p0, fraction, args.budget_tau_genes, args.within, round(fraction * 1000))
        if args.rank_only and not args.budget_tau_from and (
                missing := [g for g in near if (p0.seed, tuple(p0.layout.format(g))) not in done]):
            ap.error(f"--rank-only: {len(missing)} of the {len(near)} within-budget genes of {fraction:g} have no "
                     f"top-1 (seed {p0.seed}) in the --reuse JSONs; give the JSON that retrained them, or leave out "
                     "--rank-only to retrain them")
        genes = {"uniform": uniform_gene(p0.layout, p0.costs, int(p0.budget_mmac(fraction) * 1e6)),
                 **{label: searched_gene(p, fraction) for label, p in searchers.items()},
                 **{label: row["gene"] for label, row in recorded[fraction].items()}}
        n = 0 if args.rank_only else len(args.seeds)
        jobs = [(pipes[seed], g, run_suffix(label, pct)) for label, g in genes.items() for seed in args.seeds[:n]]
        jobs += [(p0, g, f"_budget{pct}_{k:02d}") for k, g in enumerate(near) if not args.budget_tau_from]
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda job: retrained(*job, done), jobs))
        rows = {label: summarize(p0.layout.format(g), round(p0.costs(g).macs / 1e6, 3), runs[i * n:(i + 1) * n])
                for i, (label, g) in enumerate(genes.items())}
        if not args.budget_tau_from:
            scratch = [r["top1"] for r in runs[len(genes) * n:]]
        uniform = rows.pop("uniform")
        for label, row in rows.items():
            if label in recorded[fraction]:
                row.update({k: v for k, v in recorded[fraction][label].items() if k != "gene"})
            else:
                row["pruningnet"] = trained_as[label]
            if row["runs"]:
                d = [round(s["top1"] - u["top1"], 2) for s, u in zip(row["runs"], uniform["runs"])]
                row.update(difference=d, mean_difference=round(statistics.mean(d), 2), paired_t_p=paired_t_p(d)
                           if len(d) > 1 else None, wilcoxon_p=wilcoxon_p(d) if len(d) > 1 else None)
            if near and label in searchers:
                proxy = proxy_scores(searchers[label], near, recipe.recal_batches)
                row["within_budget_tau"] = {
                    "within": args.within, "tau": kendall_tau(proxy, scratch),
                    "scratch": str(args.budget_tau_from) if args.budget_tau_from else f"seed {args.seeds[0]}",
                    "genes": [{"gene": p0.layout.format(g), "mmac": round(p0.costs(g).macs / 1e6, 3),
                               "proxy_top1": round(a, 2), "scratch_top1": b} for g, a, b in zip(near, proxy, scratch)]}
            print(f"budget {fraction:.0%} {label}: searched gene {row['mmac']} MMac"
                  + (f", top-1 {row['mean']} ± {row['std']}, searched - uniform {row['mean_difference']} (paired t p "
                     f"{row['paired_t_p']}, Wilcoxon p {row['wilcoxon_p']})" if row["runs"] else "")
                  + (f", tau within ±{args.within:.0%}: {row['within_budget_tau']['tau']:.3f}"
                     if "within_budget_tau" in row else ""))
        earlier, keys = {}, [tuple(p0.layout.format(g)) for g in near]
        for label, scores in earlier_scores(args.reuse, fraction).items() if near else ():
            if label not in rows and all(k in scores for k in keys):
                earlier[label] = kendall_tau([scores[k] for k in keys], scratch)
                print(f"budget {fraction:.0%} {label} (scores from --reuse): tau within ±{args.within:.0%}: "
                      f"{earlier[label]:.3f}")
        budgets.append({"budget": fraction, **uniform, "searched": rows, "earlier_pruningnets_tau": earlier})
        if uniform["runs"]:
            print(f"budget {fraction:.0%} uniform: mean {uniform['mean']}, std {uniform['std']}, "
                  f"max - min {uniform['spread']}")
        # after every budget: a run stopped later keeps the budgets it finished
        save_result(str(ROOT / "benchmarks" / "results"), f"retrain_spread_{name}{args.tag}.json",
                    {"arch": args.arch, "recipe": asdict(recipe), "seeds": args.seeds,
                     "pruningnets": [str(d) for d in args.pruningnets],
                     "searched_from": [str(path) for path in args.searched_from], "budgets": budgets,
                     "reused_from": [str(path) for path in args.reuse]})


if __name__ == "__main__":
    main()
