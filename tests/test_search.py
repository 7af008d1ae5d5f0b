"""meta_search_exp.py: README commands, a real tiny search on generated data, resume, export, budgets,
file names, the latency table, signals."""
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import meta_search_exp
from app import checkpoint
from app.config import parse_args
from app.distributed import Dist
from conftest import ROOT
from data import get_data, make_loader
from data.synthetic import make_image_folder
from helpers import SPLITS, TINY_DATA, assert_one_line_error, dry_run, invoke
from models import create_model, get_family
from models.cost import cost_model, count_by_hooks
from search import evolution, latency, record
from search.evaluator import CandidateEvaluator

CKPT = "checkpoints/meta_prune"
PRUNINGNET = f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
FLOPS0 = f"{CKPT}/MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar"
README_SEARCH_R50 = ("--workers 20 --arch resnet50_pruningnet --dataset imagenet --gpu 2 --resume "
                     "checkpoints/meta_prune/imagenet_resnet50_pruningnet_best.pth.tar --flops 1500 --population 100 "
                     "--select-num 30 --mutation-num 30 --crossover-num 30 --log logs/flops1500.txt "
                     "--flops-arch resnet50_prunednet")
README_SEARCH_MBV2 = ("--workers 20 --arch mobilenetv2_pruningnet --dataset imagenet --gpu 1 --resume "
                      "checkpoints/meta_prune/imagenet_mobilenetv2_pruningnet_best.pth.tar --flops 85 --population 100 "
                      "--select-num 30 --mutation-num 30 --crossover-num 30 --flops -arch mobilenetv2_prunednet "
                      "--epochs 20")
SMALL = ["--population", "6", "--select-num", "2", "--mutation-num", "2", "--crossover-num", "2", "--recal-batches", "2"]
BASE = ["--arch", "mobilenetv2_pruningnet", "--resume", PRUNINGNET, *TINY_DATA, *SMALL]
MBV2 = get_family("mobilenetv2").layout
TINY_COSTS = cost_model("mobilenetv2", 24, 3, 0.125, True)


def test_readme_resnet50_search_command_parses(tmp_path):
    cfg = dry_run("meta_search_exp.py", *shlex.split(README_SEARCH_R50), cwd=tmp_path)
    assert cfg["flops"] == 1500 and cfg["population"] == 100 and cfg["select_num"] == 30
    assert cfg["flops_arch"] == "resnet50_prunednet" and cfg["log"] == "logs/flops1500.txt" and cfg["workers"] == 20
    for key in ("data_root", "width_mult", "input_size", "seed", "val_per_class", "recal_batches", "search_resume"):
        assert key in cfg
    # one JSON object of the argparse dests and the values derived from them, nothing else
    dests = {a.dest for a in meta_search_exp.get_args_parser()._actions if a.dest != "help"}
    assert set(cfg) == dests | {"flops_name"} and cfg["flops_name"] == "1500"
    assert list(tmp_path.iterdir()) == []


def test_readme_mobilenetv2_search_typo_names_the_fix(tmp_path):
    r = invoke("meta_search_exp.py", *shlex.split(README_SEARCH_MBV2), cwd=tmp_path)
    assert_one_line_error(r, "--flops-arch", "'--flops -arch'")
    fixed = README_SEARCH_MBV2.replace("--flops -arch", "--flops-arch")
    cfg = dry_run("meta_search_exp.py", *shlex.split(fixed), cwd=tmp_path)
    assert cfg["flops"] == 85 and cfg["epochs"] == 20 and cfg["flops_arch"] == "mobilenetv2_prunednet"


# --- budgets and file names (no search needed) -------------------------------------------------------

def test_budgets_count_whole_units_from_the_number_as_written():
    assert record.millionths(8.2, round_up=False) == 8_200_000  # 8.2 * 1e6 is 8199999.999999999
    assert record.millionths(1500, round_up=False) == 1_500_000_000
    assert record.millionths(1e-7, round_up=False) == 0
    assert record.millionths(1e-7, round_up=True) == 1  # a lower bound rounds up to 1 MAC
    assert record.millionths(2.0000005, round_up=True) == 2_000_001


@pytest.mark.parametrize("flag, unit", [("--flops", "MAC"), ("--params", "parameter")])
def test_a_positive_budget_below_one_unit_is_an_error_not_no_limit(tmp_path, flag, unit):
    r = invoke("meta_search_exp.py", *shlex.split(README_SEARCH_R50), flag, "0.0000001", "--dry-run", cwd=tmp_path)
    assert_one_line_error(r, f"{flag} 1e-07 is below 1 {unit}", "give 0 for no limit")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, config, name", [
    (["--flops", "1500"], None, "flops1500"),
    (["--flops", "300.0"], None, "flops300.0"),
    (["--flops=300.0"], None, "flops300.0"),
    (["--flops", "1500", "--flops=85"], None, "flops85"),
    ([], None, "flops0"),
    ([], {"flops": 300.0}, "flops300.0"),
    ([], {"flops": 1500}, "flops1500"),
    (["--flops", "85"], {"flops": 300.0}, "flops85"),
    (["--flops", "1500", "--suffix", "_x"], None, "flops1500_x"),
    ([], {"flops": 300.0, "suffix": "_b"}, "flops300.0_b"),
])
def test_search_files_are_named_by_the_budget_as_written_and_the_suffix(tmp_path, argv, config, name):
    argv = ["--arch", "resnet50_pruningnet", "--resume", "x.pth.tar", *argv]
    if config is not None:
        (tmp_path / "search.json").write_text(json.dumps(config))
        argv += ["--json", str(tmp_path / "search.json")]
    cfg = parse_args(meta_search_exp.get_args_parser(), argv, meta_search_exp._validate, meta_search_exp.derive)
    files = record.search_files(cfg)
    assert files.checkpoint == Path(f"{CKPT}/MetaPruneSearch_resnet50_pruningnet_{name}_checkpoint.pth.tar")
    assert files.log == Path(f"logs/MetaPruneSearch_resnet50_pruningnet_{name}.txt")
    assert type(cfg.flops) is float  # the spelling names the files; the resolved value is a plain number


# --- real searches on a tiny PruningNet ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pruningnet_dir(tmp_path_factory):
    """A tiny MobileNetV2 PruningNet trained for one epoch on generated images (this module's data)."""
    work = tmp_path_factory.mktemp("search")
    make_image_folder(work / "img", num_classes=3, train_per_class=14, val_per_class=3, size=24)
    r = invoke("meta_trainer_exp.py", "--arch", "mobilenetv2_pruningnet", "--epochs", "1", *TINY_DATA, cwd=work)
    assert r.returncode == 0, r.stderr
    return work


@pytest.fixture
def work(pruningnet_dir, tmp_path):
    shutil.copytree(pruningnet_dir, tmp_path, dirs_exist_ok=True)
    return tmp_path


def search(work, *args):
    r = invoke("meta_search_exp.py", *BASE, *args, cwd=work)
    assert r.returncode == 0, r.stderr
    return r


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time (to show nothing was written)."""
    return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def budget_mmac(fraction: float) -> float:
    return round(TINY_COSTS(MBV2.full()).macs * fraction / 1e6, 3)


def test_tiny_search_end_to_end(work):
    flops = budget_mmac(0.5)
    search(work, f"--flops={flops}", "--suffix", "_e2e", "--epochs", "2")
    path = work / CKPT / f"MetaPruneSearch_mobilenetv2_pruningnet_flops{flops}_e2e_checkpoint.pth.tar"
    state = torch.load(path, weights_only=True)
    assert state["arch"] == "mobilenetv2_pruningnet" and state["iter"] == 2
    assert state["budget_name"] == str(flops) and state["suffix"] == "_e2e"
    cands = state["candidates"]
    assert len(cands) == 6 + 6 and all(len(c) == 27 for c in cands)  # 2 iterations x population, gene + error
    errors = [c[-1] for c in cands]
    assert errors == sorted(errors) and all(0 <= e <= 100 for e in errors)
    assert all(c[8] == -1 for c in cands)  # last_conv kept full width
    for c, macs in zip(cands, state["macs"]):  # counted on the real network, not by the cost model
        net = create_model("mobilenetv2_prunednet", gene=MBV2.parse(c), num_classes=3, width_mult=0.125,
                           small_input=True)
        assert count_by_hooks(net, 24) == macs <= flops * 1e6
    log = (work / "logs" / f"MetaPruneSearch_mobilenetv2_pruningnet_flops{flops}_e2e.txt").read_text()
    assert "rank" in log and "best PrunedNet exported" in log


def test_export_loads_with_models_only_and_matches_the_score(work, monkeypatch):
    flops = budget_mmac(0.6)
    search(work, "--flops", str(flops), "--epochs", "1")
    export = work / CKPT / f"MetaPruneSearch_mobilenetv2_pruningnet_flops{flops}_best_prunednet.pth.tar"
    state = torch.load(export, weights_only=True)
    net = create_model(state["arch"], gene=state["gene"], **state["model_args"])
    net.load_state_dict(state["model"])
    search_state = torch.load(export.with_name(export.name.replace("_best_prunednet", "_checkpoint")), weights_only=True)
    best = search_state["candidates"][0]
    assert MBV2.format(tuple(state["gene"])) == best[:-1]
    assert state["channels"][-1]["layer"] == "classifier"
    monkeypatch.chdir(work)  # the sub-validation split file lives under the run's working directory
    data = get_data("imagenet", "img", 24, val_per_class=4, split_dir=SPLITS)
    net.eval()
    with torch.no_grad():  # top-1 by hand: argmax of the exported network's logits
        right = [(net(x).argmax(1) == y).sum().item() for x, y in make_loader(data.subval, 8, False, 0)]
    top1 = 100 * sum(right) / len(data.subval)
    # the exported weights reproduce the score the search ranked them by
    assert top1 == pytest.approx(100 - best[-1], abs=1e-3) and top1 == pytest.approx(state["best_top1"], abs=1e-3)


@pytest.fixture(scope="module")
def straight(pruningnet_dir, tmp_path_factory) -> dict:
    """The checkpoint of an uninterrupted 3-iteration search, which stopped and resumed searches must equal."""
    work = tmp_path_factory.mktemp("straight")
    shutil.copytree(pruningnet_dir, work, dirs_exist_ok=True)
    search(work, "--epochs", "3")
    return torch.load(work / FLOPS0, weights_only=True)


def test_search_is_deterministic_and_resume_equals_uninterrupted(work, straight):
    search(work, "--epochs", "1", "--log", "logs/b.txt")
    cut = work / FLOPS0
    assert torch.load(cut, weights_only=True)["iter"] == 1
    search(work, "--epochs", "3", "--search-resume", str(cut), "--log", "logs/b.txt")
    resumed = torch.load(cut, weights_only=True)
    assert resumed["iter"] == 3 and resumed["candidates"] == straight["candidates"]
    assert resumed["state"] == straight["state"]


def test_retrain_candidate_from_search(work):
    search(work, "--epochs", "1")
    cands = torch.load(work / FLOPS0, weights_only=True)["candidates"]
    r = invoke("meta_trainer_exp.py", "--arch", "mobilenetv2_prunednet", "--search-resume", FLOPS0, "--candidate", "1",
               "--epochs", "1", "--inherit", *TINY_DATA, cwd=work)
    assert r.returncode == 0, r.stderr
    state = checkpoint.load(work / CKPT / "imagenet_mobilenetv2_prunednet_flops0_candidate1_best.pth.tar")
    assert MBV2.format(tuple(state["gene"])) == cands[1][:-1]
    r = invoke("meta_trainer_exp.py", "--arch", "mobilenetv2_prunednet", "--search-resume", FLOPS0, "--candidate", "99",
               *TINY_DATA, cwd=work)
    assert_one_line_error(r, "--candidate 99", "holds 6 candidates")


@pytest.mark.parametrize("args, words", [
    (["--flops", "0.001"], ["budget cannot be met", "--flops 0.00 MMac is below the narrowest gene's"]),
    (["--min-flops", "1000"], ["--min-flops", "above the full gene"]),
    (["--params", "0.0001"], ["--params"]),
])
def test_infeasible_budget_is_immediate_error(work, args, words):
    r = invoke("meta_search_exp.py", *BASE, *args, cwd=work)
    assert_one_line_error(r, *words)
    assert not list((work / CKPT).glob("MetaPruneSearch_*")) and not list((work / "logs").glob("MetaPruneSearch_*"))


def test_band_without_genes_is_an_error_before_anything_is_written(work):
    # above the narrowest gene and below the full one, so the quick checks pass; but no gene costs
    # exactly one MAC more than the narrowest: only sampling the first population can tell
    mmac = f"{(TINY_COSTS(MBV2.narrowest()).macs + 1) / 1e6:.6f}"
    before = snapshot(work)
    r = invoke("meta_search_exp.py", *BASE, "--flops", mmac, "--min-flops", mmac, cwd=work)
    assert_one_line_error(r, "budget cannot be met", "found no gene within the budget", "widen --flops/--min-flops")
    assert snapshot(work) == before


def test_search_goes_on_when_the_budget_admits_fewer_genes_than_the_population(work, monkeypatch):
    # The tiny network's channel counts tie across many ids, so no budget of it admits only a few
    # genes; a sampler that finds at most 2 new ones stands in for a nearly exhausted budget (the
    # real case, ResNet50 near its narrowest gene, is in test_evolution.py).
    sample = evolution.sample_feasible
    monkeypatch.setattr(evolution, "sample_feasible", lambda layout, rng, feasible, n, **kw:
                        sample(layout, rng, feasible, min(n, 2), **kw))
    r = search(work, "--epochs", "2")
    assert "only 2 distinct genes within the budget found for the first population of 6" in r.stdout
    state = torch.load(work / FLOPS0, weights_only=True)
    assert state["iter"] == 2 and 2 < len(state["candidates"]) < 12


def test_wrong_checkpoint_kinds_are_named(work):
    r = invoke("meta_search_exp.py", "--arch", "mobilenetv2_pruningnet", "--search-resume", PRUNINGNET, *TINY_DATA,
               cwd=work)
    assert_one_line_error(r, "a model checkpoint", "not a search checkpoint")
    r = invoke("meta_search_exp.py", "--arch", "resnet50_pruningnet", "--resume", PRUNINGNET, *TINY_DATA, cwd=work)
    assert_one_line_error(r, "holds mobilenetv2_pruningnet")


# --- resume checks ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def searched(pruningnet_dir, tmp_path_factory):
    """A finished 2-iteration search (flops0) beside its PruningNet; the tests below must not write to it."""
    work = tmp_path_factory.mktemp("searched")
    shutil.copytree(pruningnet_dir, work, dirs_exist_ok=True)
    search(work, "--epochs", "2")
    return work


def test_a_search_refuses_to_write_while_a_live_run_holds_its_name(searched, tmp_path):
    shutil.copytree(searched, tmp_path, dirs_exist_ok=True)
    name = Path(FLOPS0).name.removesuffix("_checkpoint.pth.tar")
    before = snapshot(tmp_path)
    with checkpoint.run_lock(tmp_path / CKPT, name):  # an open file description of its own, as another process has
        r = invoke("meta_search_exp.py", *BASE, "--epochs", "2", "--overwrite", cwd=tmp_path)
    assert_one_line_error(r, f"another run of {name} is writing its files (pid {os.getpid()}")
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.name.startswith(".")} == \
        {k: v for k, v in before.items() if not k.name.startswith(".")}


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update(state={}), "not a search state (KeyError: 'rng_state')"),
    (lambda s: s["state"].update(scored_errors=[]), "not a search state (ValueError"),
    (lambda s: s["state"]["rng_state"].update(internal=[1, 2]), "not a search state"),
    (lambda s: s["candidates"].insert(0, ["a", 1]), "candidate 0 is ['a', 1]"),
    (lambda s: s["settings"].update(pruningnet_trained=["a", "b"]), "pruningnet_trained is ['a', 'b']"),
    (lambda s: s["settings"].update(pruningnet_run=3), "pruningnet_run is 3"),
])
def test_a_search_checkpoint_damaged_inside_is_one_line_for_the_search_and_the_retraining(searched, tmp_path, edit,
                                                                                          words):
    shutil.copytree(searched, tmp_path, dirs_exist_ok=True)
    state = torch.load(tmp_path / FLOPS0, weights_only=True)
    edit(state)
    torch.save(state, tmp_path / FLOPS0)
    before = snapshot(tmp_path)
    r = invoke("meta_search_exp.py", *BASE, "--epochs", "3", "--search-resume", FLOPS0, cwd=tmp_path)
    assert_one_line_error(r, f"--search-resume {FLOPS0}: damaged checkpoint ({words}")
    r = invoke("meta_trainer_exp.py", *TINY_DATA, "--arch", "mobilenetv2_prunednet", "--search-resume", FLOPS0,
               "--epochs", "1", cwd=tmp_path)
    assert_one_line_error(r, f"--search-resume {FLOPS0}: damaged checkpoint ({words}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag, saved, given", [
    ("--seed", "0", "1"),
    ("--recal-batches", "2", "3"),
    ("--batch-size", "8", "4"),
    ("--val-per-class", "4", "3"),
    ("--input-size", "24", "32"),
    ("--population", "6", "8"),
    ("--select-num", "2", "3"),
    ("--mutation-num", "2", "1"),
    ("--crossover-num", "2", "1"),
    ("--mutation-prob", "0.1", "0.5"),
])
def test_resume_with_a_changed_setting_names_the_flag_and_both_values(searched, flag, saved, given):
    before = snapshot(searched)
    r = invoke("meta_search_exp.py", *BASE, "--epochs", "3", "--search-resume", FLOPS0, flag, given, cwd=searched)
    assert_one_line_error(r, f"the search ran with {flag} {saved}, this run has {flag} {given}")
    assert snapshot(searched) == before


def test_resume_checks_the_pruningnet_and_the_iterations_done(work):
    search(work, "--epochs", "2")
    r = invoke("meta_search_exp.py", *BASE, "--epochs", "1", "--search-resume", FLOPS0, cwd=work)
    assert_one_line_error(r, "has done 2 iterations, more than --epochs 1", "give --epochs 2")
    done = torch.load(work / FLOPS0, weights_only=True)
    r = search(work, "--epochs", "2", "--search-resume", FLOPS0)  # as many as done: report the result
    assert "best PrunedNet exported" in r.stdout
    assert torch.load(work / FLOPS0, weights_only=True)["candidates"] == done["candidates"]
    # the checkpoint names its PruningNet once (absolute), and that is the one a resume without --resume takes
    assert "pruningnet" not in done and done["settings"]["resume"] == str((work / PRUNINGNET).resolve())
    r = invoke("meta_search_exp.py", *[a for a in BASE if a not in ("--resume", PRUNINGNET)], "--epochs", "2",
               "--search-resume", FLOPS0, cwd=work)
    assert r.returncode == 0 and "best PrunedNet exported" in r.stdout, r.stderr
    other = work / CKPT / "other_pruningnet.pth.tar"
    shutil.copy(work / PRUNINGNET, other)
    r = invoke("meta_search_exp.py", *BASE, "--epochs", "3", "--search-resume", FLOPS0, "--resume", str(other),
               cwd=work)
    assert_one_line_error(r, "the search ran with --resume", str(work / PRUNINGNET), str(other))
    state = checkpoint.load(work / PRUNINGNET)
    torch.save({**state, "epoch": state["epoch"] + 1}, work / PRUNINGNET)
    before = snapshot(work)
    r = invoke("meta_search_exp.py", *BASE, "--epochs", "3", "--search-resume", FLOPS0, cwd=work)
    assert_one_line_error(r, f"was at epoch {state['epoch']} step 0 when the search began",
                          f"now at epoch {state['epoch'] + 1}")
    assert snapshot(work) == before


# --- signals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_search_and_the_resumed_search_ends_as_an_uninterrupted_one(work, monkeypatch, signum,
                                                                                      straight):
    scored, top1 = [], CandidateEvaluator.top1

    def signalled_top1(self, gene):
        scored.append(gene)
        if len(scored) == 8:  # the second candidate of iteration 2 (6 per iteration)
            os.kill(os.getpid(), signum)
        return top1(self, gene)

    monkeypatch.setattr(CandidateEvaluator, "top1", signalled_top1)
    r = invoke("meta_search_exp.py", *BASE, "--epochs", "3", cwd=work)
    assert r.returncode == 128 + signum, r.stderr
    assert "Traceback" not in r.stderr
    assert f"stopped by signal {signum}; resume with the same flags plus --search-resume {FLOPS0}" in r.stdout
    assert len(scored) == 8  # the iteration is abandoned at the next candidate
    assert torch.load(work / FLOPS0, weights_only=True)["iter"] == 1
    monkeypatch.undo()
    search(work, "--epochs", "3", "--search-resume", FLOPS0)
    resumed = torch.load(work / FLOPS0, weights_only=True)
    assert resumed["candidates"] == straight["candidates"] and resumed["state"] == straight["state"]


def test_a_signal_before_the_first_iteration_ends_says_there_is_nothing_to_resume(work, monkeypatch):
    top1 = CandidateEvaluator.top1

    def signalled_top1(self, gene):
        os.kill(os.getpid(), signal.SIGINT)
        return top1(self, gene)

    monkeypatch.setattr(CandidateEvaluator, "top1", signalled_top1)
    r = invoke("meta_search_exp.py", *BASE, "--epochs", "3", cwd=work)
    assert r.returncode == 130 and "nothing to resume: run the same command again" in r.stdout
    assert not (work / FLOPS0).exists()


# --- latency table ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_lut(pruningnet_dir, tmp_path_factory):
    """The tiny PruningNet's directory with a latency table measured by ``--build-lut``."""
    work = tmp_path_factory.mktemp("lut")
    shutil.copytree(pruningnet_dir, work, dirs_exist_ok=True)
    r = invoke("meta_search_exp.py", *BASE, "--build-lut", "--lut-repeats", "3", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "mean |error|" in r.stdout
    return work


@pytest.fixture
def lut_work(with_lut, tmp_path):
    shutil.copytree(with_lut, tmp_path, dirs_exist_ok=True)
    return tmp_path


LUT = f"{CKPT}/latency_mobilenetv2_cpu_24px_w0.125_bs1.json"


def test_latency_table_build_and_budget(lut_work):
    work = lut_work
    r = invoke("meta_search_exp.py", *BASE, "--latency", "5", "--lut", "missing.json", cwd=work)
    assert_one_line_error(r, "--lut missing.json: no such file", "--build-lut")
    table = latency.LatencyTable.load(work / LUT)
    assert len(table.validation) == 8 and all(v["lut_ms"] > 0 and v["measured_ms"] > 0 for v in table.validation)
    assert [c["id"] for c in table.calibration] == list(latency.GRID)
    assert table.setting() == latency.setting("mobilenetv2", 24, 0.125, True, 3, 1)
    assert not list((work / CKPT).glob("MetaPruneSearch_*"))  # building the table alone runs no search
    spec = checkpoint.build_model(checkpoint.load(work / PRUNINGNET)).spec
    full_ms, narrow_ms = table(MBV2.full(), spec.bases), table(MBV2.narrowest(), spec.bases)
    # Between the two ends, never below the narrowest gene's estimate (the search refuses a budget below it),
    # rounded up: on a loaded machine the timings of a tiny network are mostly noise, and the two ends may be
    # estimated equal, or even the wrong way round.
    budget = math.ceil(max(narrow_ms, (full_ms + narrow_ms) / 2) * 1e4) / 1e4
    search(work, "--latency", str(budget), "--epochs", "2")
    state = torch.load(work / FLOPS0.replace("_flops0_", f"_flops0_latency{budget:g}_"), weights_only=True)
    assert state["budget"]["latency"] == budget
    assert all(table(MBV2.parse(c), spec.bases) <= budget for c in state["candidates"])


def test_latency_calibration_maps_raw_sums_onto_measurements():
    """Hand-made calibration points, one of them noisy (a wider gene measured faster)."""
    points = [(1.0, 2.0), (2.0, 3.5), (3.0, 3.0), (4.0, 6.0)]  # (raw sum, measured ms)
    table = latency.LatencyTable("mobilenetv2", 24, 0.125, True, 3, 1, "cpu", 0.0, [], {},
                                 [{"id": i, "lut_ms": raw, "measured_ms": ms} for i, (raw, ms) in enumerate(points)])
    cases = {1.0: 2.0, 2.0: 3.5, 2.5: 3.5, 3.0: 3.5, 3.5: 4.75, 4.0: 6.0,  # the noisy 3.0 flattened to 3.5
             0.5: 1.0, 8.0: 12.0}  # beyond the ends: in proportion to the nearest point
    assert {raw: table.calibrated(raw) for raw in cases} == pytest.approx(cases)


def test_latency_estimate_is_calibrated_on_whole_network_timings(lut_work):
    table = latency.LatencyTable.load(lut_work / LUT)
    spec = checkpoint.build_model(checkpoint.load(lut_work / PRUNINGNET)).spec
    # the calibration genes' raw sums are the table's; the estimate is monotone in the raw sum
    for c in table.calibration:
        gene = tuple(30 if p in MBV2.fixed else c["id"] for p in range(len(MBV2)))
        assert table.raw(gene, spec.bases) == pytest.approx(c["lut_ms"])
    raws = sorted(c["lut_ms"] for c in table.calibration)
    estimates = [table.calibrated(x) for x in [raws[0] * f for f in (0.5, 0.9)] + raws + [raws[-1] * 1.5]]
    # monotone, up to the rounding of the two formulas (interpolation, extrapolation) that meet at the ends
    assert all(b >= a * (1 - 1e-12) for a, b in zip(estimates, estimates[1:])), estimates


@pytest.mark.parametrize("edit, words", [
    (lambda text: "{not json", ["not a latency table (not JSON"]),
    (lambda text: '{"device": "cpu"}', ["not a latency table (JSON without its fields)"]),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "version"}), ["format 1"]),
    (lambda text: json.dumps({**json.loads(text), "tables": {}}), ["inconsistent latency table"]),
    (lambda text: json.dumps({**json.loads(text), "arch": "resnet50"}), ["arch resnet50 (this search: mobilenetv2)"]),
    (lambda text: json.dumps({**json.loads(text), "input_size": 32}), ["input_size 32 (this search: 24)"]),
    (lambda text: json.dumps({**json.loads(text), "width_mult": 0.25}), ["width_mult 0.25 (this search: 0.125)"]),
    (lambda text: json.dumps({**json.loads(text), "batch_size": 4}), ["batch_size 4 (this search: 1)"]),
    (lambda text: json.dumps({**json.loads(text), "fixed_ms": "x"}), ['field fixed_ms is "x"']),
    (lambda text: json.dumps({**json.loads(text), "input_size": "24"}), ['field input_size is "24"']),
    (lambda text: json.dumps({**json.loads(text), "layers": [{k: v for k, v in layer.items() if k != "in_slot"}
                                                               for layer in json.loads(text)["layers"]]}),
     ["has no integer gene slots"]),
    (lambda text: json.dumps({**json.loads(text), "layers": [{**layer, "out_slot": 99}
                                                               for layer in json.loads(text)["layers"]]}),
     ["inconsistent latency table"]),
])
def test_a_bad_or_foreign_latency_table_is_a_one_line_error(lut_work, edit, words):
    bad = lut_work / "bad.json"
    bad.write_text(edit((lut_work / LUT).read_text()))
    before = snapshot(lut_work)
    r = invoke("meta_search_exp.py", *BASE, "--latency", "5", "--lut", "bad.json", cwd=lut_work)
    assert_one_line_error(r, "--lut bad.json:", *words, "--build-lut")
    assert snapshot(lut_work) == before


def test_build_lut_measures_on_rank_0_only_and_every_rank_loads_the_saved_table(lut_work, monkeypatch):
    monkeypatch.chdir(lut_work)
    (lut_work / LUT).unlink()
    argv = [*BASE, "--build-lut", "--lut-repeats", "2"]
    cfg = parse_args(meta_search_exp.get_args_parser(), argv, meta_search_exp._validate, meta_search_exp.derive)
    state, fixed = meta_search_exp.load_pruningnet(cfg, cfg.resume)
    args, net = cfg.replace(**fixed), checkpoint.build_model(state)
    log = Path("logs/lut.txt")
    events, build = [], latency.build
    monkeypatch.setattr(latency, "build", lambda *a, **k: events.append("build") or build(*a, **k))
    # what rank 1 finds after the barrier is what rank 0 saved before it
    monkeypatch.setattr(meta_search_exp, "barrier", lambda: events.append(("barrier", (lut_work / LUT).is_file())))
    first = meta_search_exp.latency_table(args, net, torch.device("cpu"), Dist(0, 2), log)
    assert events == ["build", ("barrier", True)]
    events.clear()
    second = meta_search_exp.latency_table(args, net, torch.device("cpu"), Dist(1, 2), log)
    assert events == [("barrier", True)]
    assert second == first == latency.LatencyTable.load(lut_work / LUT)


def test_build_lut_under_torchrun_finishes_with_one_table(lut_work):
    (lut_work / LUT).unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "meta_search_exp.py"), *BASE, "--build-lut", "--lut-repeats", "2"]
    r = subprocess.run(cmd, cwd=lut_work, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("measuring the latency table") == 1
    assert latency.LatencyTable.load(lut_work / LUT).setting()["input_size"] == 24
