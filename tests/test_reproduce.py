"""The reproduction benchmark's own pieces: the proxy-quality genes, Kendall's tau, reuse of earlier results."""
import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from app import checkpoint
from app.config import CHECKPOINT_SUBDIR
from benchmarks.reproduce import REPRO, ReusingPipeline, budget_genes, earlier_results, spread_genes
from benchmarks.retrain_spread import earlier_band, earlier_scores, earlier_spread, retrained
from benchmarks.stats import kendall_tau, paired_t_p, wilcoxon_p
from data.synthetic import make_fashion_mnist
from pipeline import QUICK, Pipeline, StageFailed


def test_tau_genes_are_distinct_and_cover_the_range(tmp_path):
    p = Pipeline("resnet50", 0, QUICK, tmp_path)
    genes = spread_genes(p, 12, 0.15, 0.9, seed=1)
    assert len(set(genes)) == 12
    full = p.costs(p.layout.full()).macs
    for k, g in enumerate(genes):
        target = 0.15 + 0.75 * (k + 0.5) / 12
        assert abs(p.costs(g).macs / full - target) < 0.02, (k, p.costs(g).macs / full)


def test_paired_t_p_values_against_their_closed_forms():
    # df 1: p = 1 - 2/pi atan|t|; df 2: p = 1 - |t| / sqrt(2 + t^2)
    for d in ([2.0, 2.1], [0.3, -0.1], [1.0, 2.0, 4.0], [-0.5, 0.1, 0.2]):
        t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
        closed = 1 - 2 / math.pi * math.atan(abs(t)) if len(d) == 2 else 1 - abs(t) / math.sqrt(2 + t * t)
        assert paired_t_p(d) == pytest.approx(closed, rel=1e-9)
    assert paired_t_p([1.0, 1.0, 1.0]) == 0.0 and paired_t_p([0.0, 0.0]) == 1.0


def test_wilcoxon_p_values_counted_by_hand():
    assert wilcoxon_p([1, 2, 3, 4, 5]) == 2 / 32  # W+ at its maximum: 1 of 32 sign sets, and its mirror
    assert wilcoxon_p([-1, 2, 3, 4, 5]) == 4 / 32  # W- = 1: {}, {1} and their mirrors
    assert wilcoxon_p([1, -1, 2, 3]) == 6 / 16  # tied magnitudes share rank 1.5
    assert wilcoxon_p([0, 0, 3]) == 1.0  # zeros dropped: one pair left, both signs as extreme


def test_budget_genes_lie_within_the_band_around_the_budget(tmp_path):
    p = Pipeline("resnet50", 0, QUICK, tmp_path)
    genes = budget_genes(p, 0.25, 8, 0.1, seed=3)
    budget = 0.25 * p.costs(p.layout.full()).macs
    assert len(set(genes)) == 8 and all(abs(p.costs(g).macs / budget - 1) <= 0.1 for g in genes)


def test_kendall_tau_b():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == -1
    # 5 concordant, 1 discordant pair of 6: (5 - 1) / 6
    assert abs(kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) - 4 / 6) < 1e-12


def _earlier_run(path, recipe, genes):
    row = {"gene": genes[0], "mmac": 1.0, "proxy_top1": 50.0, "scratch_top1": 80.0}
    path.write_text(json.dumps({
        "recipe": asdict(recipe),
        "comparisons": [{"seed": 1, "results": [{"network": "uniform", "gene": genes[1], "top1": 70.0,
                                                 "retrain_s": 9.0}]}],
        "tau_genes": [row, row, {**row, "gene": genes[2], "scratch_top1": 81.0}],
        "tau_extra_genes": [{**row, "gene": genes[3], "scratch_top1": 82.0}],
        "within_budget_tau": {"0.25": {"within": 0.1, "tau": 0.0, "genes": [{**row, "gene": genes[4],
                                                                            "scratch_top1": 75.0}]}}}))


def test_earlier_results_give_distinct_tau_genes_and_results_by_seed_and_gene(tmp_path):
    genes = [[k] * 4 + [-1] + [k] * 16 for k in (3, 12, 20, 28, 7)]
    _earlier_run(tmp_path / "old.json", QUICK, genes)
    done, tau_seed, tau_genes = earlier_results(tmp_path / "old.json", QUICK)
    assert tau_seed == 1
    assert tau_genes == [genes[0], genes[2], genes[3]]  # the repeated gene once, extra genes after
    assert done[(1, tuple(genes[1]))]["top1"] == 70.0
    assert [done[(1, tuple(g))]["top1"] for g in tau_genes] == [80.0, 81.0, 82.0]
    assert done[(1, tuple(genes[4]))]["top1"] == 75.0  # a within-budget gene: reused, not a tau gene


def test_earlier_results_of_another_retraining_recipe_are_refused(tmp_path):
    genes = [[k] * 4 + [-1] + [k] * 16 for k in (3, 12, 20, 28, 7)]
    _earlier_run(tmp_path / "old.json", QUICK, genes)
    # the PruningNet's side of the recipe may differ: that is what a variant changes
    earlier_results(tmp_path / "old.json", replace(QUICK, pruning_epochs=9, recal_batches=7))
    with pytest.raises(ValueError, match="differs in retrain_epochs"):
        earlier_results(tmp_path / "old.json", replace(QUICK, retrain_epochs=9))
    with pytest.raises(ValueError, match="differs in zero_init_residual"):
        earlier_results(tmp_path / "old.json", replace(QUICK, zero_init_residual=True))
    old = json.loads((tmp_path / "old.json").read_text())
    del old["recipe"]["zero_init_residual"]  # a JSON written before the field: retrained without it
    (tmp_path / "old.json").write_text(json.dumps(old))
    earlier_results(tmp_path / "old.json", QUICK)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a readable reproduce JSON"):
        earlier_results(tmp_path / "bad.json", QUICK)


def test_reusing_pipeline_returns_an_earlier_result_without_training(tmp_path):
    p = ReusingPipeline("resnet50", 1, QUICK, tmp_path / "run", done={})
    gene = p.layout.full()
    p.done[(1, tuple(p.layout.format(gene)))] = {"top1": 70.0, "retrain_s": 9.0}
    assert p.retrain(gene, "_uniform25") == {"top1": 70.0}
    assert p.times["retrain_uniform25"] == 9.0
    assert not (tmp_path / "run").exists()  # no stage ran


def test_a_variant_reuses_trained_pruningnets_and_searches_near_the_budget(tmp_path):
    root = str(make_fashion_mnist(tmp_path / "fm", train_per_class=40, test_per_class=5))
    earlier = Pipeline("resnet50", 0, QUICK, tmp_path / "earlier" / "seed0", root, cpu=True)
    earlier.train_pruningnet()
    p = ReusingPipeline("resnet50", 0, replace(QUICK, min_fraction=0.9), tmp_path / "variant" / "seed0", root,
                        done={}, pruningnets=tmp_path / "earlier", cpu=True)
    p.train_pruningnet()
    assert p.times["PruningNet"] == 0  # copied, not trained
    copied = (p.run_dir / p.pruningnet).read_bytes()
    assert copied == (earlier.run_dir / earlier.pruningnet).read_bytes()
    budget = p.budget_mmac(0.25)
    costs = [p.costs(p.layout.parse(c)).macs / 1e6 for c in p.search(budget)]
    assert costs and all(0.9 * budget <= c <= budget for c in costs)

    longer = ReusingPipeline("resnet50", 0, replace(QUICK, pruning_epochs=2), tmp_path / "longer" / "seed0", root,
                             done={}, pruningnets=tmp_path / "earlier")
    with pytest.raises(ValueError, match=r"another recipe \(epochs\)"):
        longer.train_pruningnet()


def test_a_finished_retraining_is_read_back_and_another_gene_is_trained(tmp_path):
    root = str(make_fashion_mnist(tmp_path / "fm", train_per_class=40, test_per_class=5))
    p = Pipeline("resnet50", 3, QUICK, tmp_path / "run", root, cpu=True)
    first = retrained(p, p.layout.full(), "_uniform25")
    assert "retrain_uniform25" in p.times and first["seed"] == 3 and first["retrain_s"] > 0
    p.times.clear()
    again = retrained(p, p.layout.full(), "_uniform25")
    assert again["top1"] == first["top1"] and again["retrain_s"] is None
    assert not p.times  # read back: no stage ran
    with pytest.raises(StageFailed):  # another gene under that name is trained, and refuses to replace the run
        retrained(p, p.layout.narrowest(), "_uniform25")


def test_a_stopped_retraining_goes_on_from_its_last_epoch(tmp_path):
    root = str(make_fashion_mnist(tmp_path / "fm", train_per_class=40, test_per_class=5))
    p = Pipeline("resnet50", 3, QUICK, tmp_path / "run", root, cpu=True)
    gene = p.layout.parse(QUICK_GENE)
    retrained(p, gene, "_uniform25")
    # the same folder under a 2-epoch recipe holds that run stopped after its first epoch
    p = Pipeline("resnet50", 3, replace(QUICK, retrain_epochs=2), tmp_path / "run", root, cpu=True)
    ended = retrained(p, gene, "_uniform25")
    assert ended["retrain_s"] > 0
    saved = p.run_dir / CHECKPOINT_SUBDIR / "fashionmnist_resnet50_prunednet_uniform25_checkpoint.pth.tar"
    assert checkpoint.load(saved)["epoch"] == 2
    log = p.run_dir / "logs" / "fashionmnist_resnet50_prunednet_uniform25.jsonl"
    epochs = [r["epoch"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "epoch"]
    assert epochs == [1, 2]  # the first epoch was not trained again


def test_the_within_budget_genes_of_an_earlier_run_come_back_with_their_top1(tmp_path):
    genes = [[k] * 4 + [-1] + [k] * 16 for k in (3, 12, 20, 28, 7)]
    _earlier_run(tmp_path / "old.json", QUICK, genes)
    p = Pipeline("resnet50", 0, QUICK, tmp_path / "run")
    near, top1 = earlier_band(tmp_path / "old.json", 0.25, p)
    assert [p.layout.format(g) for g in near] == [genes[4]] and top1 == [75.0]
    assert earlier_band(tmp_path / "old.json", 0.5, p) == ([], [])  # no tau measured at that budget
    (tmp_path / "bad.json").write_text('{"within_budget_tau": {"0.25": {}}}')
    with pytest.raises(ValueError, match="not a reproduce JSON with within-budget genes"):
        earlier_band(tmp_path / "bad.json", 0.25, p)


QUICK_GENE = [12] * 4 + [-1] + [12] * 16


def _earlier_spread(path, recipe, genes):
    runs = lambda top1: [{"seed": s, "top1": top1 + s, "retrain_s": 9.0} for s in (0, 1)]
    tau = lambda scratch, gene: {"within": 0.1, "tau": 0.0, "scratch": scratch,
                                 "genes": [{"gene": gene, "mmac": 1.0, "proxy_top1": 50.0, "scratch_top1": 75.0}]}
    path.write_text(json.dumps({"recipe": asdict(recipe), "budgets": [{
        "budget": 0.25, "gene": genes[0], "mmac": 1.0, "runs": runs(80.0),
        "searched": {"a": {"gene": genes[1], "runs": runs(81.0), "within_budget_tau": tau("seed 0", genes[2])},
                     "b": {"gene": genes[3], "runs": runs(82.0), "within_budget_tau": tau("old.json", genes[4])}}}]}))


def test_an_earlier_spread_run_gives_its_results_by_seed_and_gene_and_they_are_not_retrained(tmp_path):
    genes = [[k] * 4 + [-1] + [k] * 16 for k in (3, 12, 20, 28, 7)]
    _earlier_spread(tmp_path / "old.json", QUICK, genes)
    done = earlier_spread(tmp_path / "old.json", replace(QUICK, pruning_epochs=9, sandwich=2))
    assert done[(1, tuple(genes[0]))]["top1"] == 81.0 and done[(0, tuple(genes[3]))]["top1"] == 82.0
    assert done[(0, tuple(genes[2]))]["top1"] == 75.0  # a within-budget gene retrained by that run
    assert (0, tuple(genes[4])) not in done  # its top-1 came from another JSON, with that JSON's recipe
    assert len(done) == 7
    # each PruningNet's scores of its within-budget genes, for a tau against new top-1 of them
    assert earlier_scores([tmp_path / "old.json"], 0.25) == {"a": {tuple(genes[2]): 50.0}, "b": {tuple(genes[4]): 50.0}}
    assert earlier_scores([tmp_path / "old.json"], 0.5) == {}
    p = Pipeline("resnet50", 1, QUICK, tmp_path / "run", cpu=True)
    assert retrained(p, p.layout.parse(genes[1]), "_a_25", done) == {"seed": 1, "top1": 82.0, "retrain_s": None}
    assert not p.times and not (tmp_path / "run").exists()  # no stage ran
    with pytest.raises(ValueError, match="differs in retrain_epochs, zero_init_residual"):
        earlier_spread(tmp_path / "old.json", replace(QUICK, retrain_epochs=9, zero_init_residual=True))
    (tmp_path / "bad.json").write_text('{"recipe": {}}')
    with pytest.raises(ValueError, match="not a readable retrain_spread JSON"):
        earlier_spread(tmp_path / "bad.json", QUICK)


def _rank_only(tmp_path, monkeypatch, reuse, trained=True):
    """retrain_spread.py --rank-only over one PruningNet folder, its search and scoring stubbed: (exit status or
    None, the JSON it saved). ``trained``: the folder holds a PruningNet checkpoint (weights left out) whose
    config says it was trained 15 epochs with --sandwich 2 --distill."""
    import benchmarks.retrain_spread as spread

    folder = tmp_path / "v" / "seed0"
    (folder / "checkpoints").mkdir(parents=True)
    if trained:
        config = {"epochs": 15, "lr": 0.05, "sandwich": 2, "distill": True, "seed": 0, "width_mult": 0.25,
                  "batch_size": 256, "workers": 0}
        checkpoint.save({"format": checkpoint.FORMAT, "kind": checkpoint.MODEL, "arch": "resnet50_pruningnet",
                         "model_args": {"num_classes": 10, "width_mult": 0.25, "small_input": False}, "model": {},
                         "config": config}, Pipeline("resnet50", 0, REPRO, folder).pruningnet)
    saved = {}
    monkeypatch.setattr(spread, "searched_gene", lambda p, fraction: p.layout.narrowest())
    monkeypatch.setattr(spread, "proxy_scores", lambda p, genes, recal: [float(sum(p.layout.format(g))) for g in genes])
    monkeypatch.setattr(spread, "save_result", lambda folder, name, data: saved.update(name=name, data=data))
    monkeypatch.setattr(Pipeline, "retrain", lambda *a, **k: pytest.fail("--rank-only retrained a gene"))
    monkeypatch.setattr(sys, "argv", ["retrain_spread.py", "--rank-only", "--seeds", "0", "--retrain-epochs", "12",
                                      "--pruningnets", str(folder), "--budget-tau-genes", "3",
                                      "--reuse", str(reuse), "--tag", "_rank"])
    try:
        spread.main()
    except SystemExit as e:
        return e.code, saved
    return None, saved


def test_rank_only_scores_a_pruningnet_against_reused_top1_and_retrains_nothing(tmp_path, monkeypatch, capsys):
    recipe = replace(REPRO, retrain_epochs=12)
    p0 = Pipeline("resnet50", 0, recipe, tmp_path / "any")
    near = [p0.layout.format(g) for g in budget_genes(p0, 0.25, 3, 0.1, 250)]
    reuse = tmp_path / "old.json"
    reuse.write_text(json.dumps({"recipe": asdict(recipe), "budgets": [{
        "budget": 0.25, "gene": near[0], "runs": [], "searched": {"old": {"gene": near[0], "runs": [],
            "within_budget_tau": {"scratch": "seed 0", "genes": [{"gene": g, "proxy_top1": 1.0, "scratch_top1": t}
                                                                 for g, t in zip(near[:2], (80.0, 81.0))]}}}}]}))
    # a within-budget gene with no reused top-1: refused before any search
    status, saved = _rank_only(tmp_path, monkeypatch, reuse)
    assert status == 2 and not saved
    assert "--rank-only: 1 of the 3 within-budget genes of 0.25 have no top-1 (seed 0)" in capsys.readouterr().err

    data = json.loads(reuse.read_text())
    data["budgets"][0]["searched"]["old"]["within_budget_tau"]["genes"].append(
        {"gene": near[2], "proxy_top1": 1.0, "scratch_top1": 82.0})
    reuse.write_text(json.dumps(data))
    status, saved = _rank_only(tmp_path / "again", monkeypatch, reuse)
    assert status is None and saved["name"] == "retrain_spread_resnet50_e12_rank.json"
    row = saved["data"]["budgets"][0]["searched"]["v"]
    assert row["runs"] == [] and row["gene"] == p0.layout.format(p0.layout.narrowest())
    # the result says how its PruningNet was trained, not what the retraining recipe's pruning fields hold
    assert row["pruningnet"] == {"epochs": 15, "lr": 0.05, "sandwich": 2, "distill": True, "seed": 0,
                                 "width_mult": 0.25, "batch_size": 256}
    tau = row["within_budget_tau"]
    assert [g["scratch_top1"] for g in tau["genes"]] == [80.0, 81.0, 82.0]
    proxy = [float(sum(g)) for g in near]
    assert tau["tau"] == kendall_tau(proxy, [80.0, 81.0, 82.0])

    # a folder without its PruningNet: refused in one line before any search
    status, saved = _rank_only(tmp_path / "untrained", monkeypatch, reuse, trained=False)
    assert status == 2 and not saved
    err = capsys.readouterr().err
    assert "--pruningnets " in err and "fashionmnist_resnet50_pruningnet_best.pth.tar: no such file" in err


def test_searched_genes_of_an_earlier_run_are_retrained_with_the_seeds_without_their_pruningnet(
        tmp_path, monkeypatch, capsys):
    import benchmarks.retrain_spread as spread

    searched = [5] * 4 + [-1] + [6] * 16
    tau = {"within": 0.1, "tau": 0.4, "scratch": "seed 0", "genes": []}
    trained_as = {"epochs": 15, "sandwich": 2, "distill": False}
    old = tmp_path / "rank.json"
    old.write_text(json.dumps({"budgets": [{"budget": 0.25, "gene": searched, "runs": [], "searched": {
        "v_pn15": {"gene": searched, "runs": [], "pruningnet": trained_as, "within_budget_tau": tau}}}]}))
    saved, trained = {}, []

    def retrain(p, gene, suffix, resume=None):  # top-1 by gene and seed: searched beats uniform by 0.5 + seed/10
        trained.append((p.seed, p.layout.format(gene), suffix))
        return {"top1": 80.0 + p.seed + (0.5 + p.seed / 10 if p.layout.format(gene) == searched else 0.0)}

    monkeypatch.setattr(Pipeline, "retrain", retrain)
    monkeypatch.setattr(spread, "searched_gene", lambda p, fraction: pytest.fail("searched without a PruningNet"))
    monkeypatch.setattr(spread, "save_result", lambda folder, name, data: saved.update(name=name, data=data))

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["retrain_spread.py", "--seeds", "0", "1", "--retrain-epochs", "3", *argv])
        try:
            spread.main()
        except SystemExit as e:
            return e.code
        return None

    assert run("--budgets", "0.25", "--searched-from", str(old), "--tag", "_again") is None
    assert sorted((seed, suffix) for seed, gene, suffix in trained if gene == searched) == [
        (0, "_v_pn15_25"), (1, "_v_pn15_25")]
    assert len(trained) == 4  # the uniform gene too, with the same seeds
    row = saved["data"]["budgets"][0]["searched"]["v_pn15"]
    assert row["gene"] == searched and [r["top1"] for r in row["runs"]] == [80.5, 81.6]
    assert row["difference"] == [0.5, 0.6] and row["mean_difference"] == 0.55
    # the earlier run's record of how its PruningNet was trained and ranked comes along, with its file
    assert row["pruningnet"] == trained_as and row["within_budget_tau"] == tau and row["searched_in"] == str(old)
    assert saved["data"]["searched_from"] == [str(old)]

    saved.clear()
    for argv, message in [(["--budgets", "0.5", "--searched-from", str(old)],
                           "--searched-from: no searched gene of the budgets 0.5"),
                          (["--searched-from", str(old), str(old)], "v_pn15 at 0.25 is in an earlier file too")]:
        assert run(*argv) == 2 and not saved
        assert message in capsys.readouterr().err


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script, argv, message", [
    ("retrain_spread.py", ["--reuse", "bad.json"], "--reuse bad.json: not a readable retrain_spread"),
    ("retrain_spread.py", ["--tag", "../x"], "--tag '../x': use letters"),
    ("reproduce.py", ["--tag", "../x"], "--tag '../x': use letters")])
def test_a_bad_reuse_file_or_tag_is_one_line_before_anything_runs(tmp_path, script, argv, message):
    (tmp_path / "bad.json").write_text("[]")
    script = BENCHMARKS / script
    run = subprocess.run([sys.executable, str(script), *argv], check=False, cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_the_reproduction_writes_its_json_summary_and_plot_into_out(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm", train_per_class=40, test_per_class=5)
    run = subprocess.run([sys.executable, str(BENCHMARKS / "reproduce.py"), "--quick", "--seeds", "0", "--budgets",
                          "--tau-genes", "2", "--tau-recal", "2", "--data-root", str(root), "--out", "out"],
                         check=False, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "reproduce_resnet50_quick.json", "reproduce_resnet50_quick.md", "reproduce_resnet50_quick_tau.png"]
    result = json.loads((out / "reproduce_resnet50_quick.json").read_text())
    assert len(result["tau_genes"]) == 2 and result["recipe"] == asdict(QUICK)
    summary = (out / "reproduce_resnet50_quick.md").read_text()
    assert "over 2 genes" in summary and "(reproduce_resnet50_quick_tau.png)" in summary
    assert (out / "reproduce_resnet50_quick_tau.png").read_bytes()[:4] == b"\x89PNG"
