"""meta_search_exp.py: README commands, a real tiny search on generated data, resume, export."""
import shlex
import shutil

import pytest
import torch

from data import get_data, make_loader
from data.synthetic import make_image_folder
from helpers import TINY_DATA, assert_one_line_error, dry_run, invoke
from models import create_model, get_family
from models.cost import cost_model
from utils import checkpoint
from search import latency
from utils.engine import evaluate

CKPT = "checkpoints/meta_prune"
README_SEARCH_R50 = ("--workers 20 --arch resnet50_pruningnet --dataset imagenet --gpu 2 --resume "
                     "checkpoints/meta_prune/imagenet_resnet50_pruningnet_best.pth.tar --flops 1500 --population 100 "
                     "--select-num 30 --mutation-num 30 --crossover-num 30 --log logs/flops1500.txt "
                     "--flops-arch resnet50_prunednet")
README_SEARCH_MBV2 = ("--workers 20 --arch mobilenetv2_pruningnet --dataset imagenet --gpu 1 --resume "
                      "checkpoints/meta_prune/imagenet_mobilenetv2_pruningnet_best.pth.tar --flops 85 --population 100 "
                      "--select-num 30 --mutation-num 30 --crossover-num 30 --flops -arch mobilenetv2_prunednet "
                      "--epochs 20")
SMALL = ["--population", "6", "--select-num", "2", "--mutation-num", "2", "--crossover-num", "2", "--recal-batches", "2"]


def test_readme_resnet50_search_command_parses(tmp_path):
    cfg = dry_run("meta_search_exp.py", *shlex.split(README_SEARCH_R50), cwd=tmp_path)
    assert cfg["flops"] == 1500 and cfg["population"] == 100 and cfg["select_num"] == 30
    assert cfg["flops_arch"] == "resnet50_prunednet" and cfg["log"] == "logs/flops1500.txt" and cfg["workers"] == 20
    for key in ("data_root", "width_mult", "input_size", "seed", "val_per_class", "recal_batches", "search_resume"):
        assert key in cfg
    assert list(tmp_path.iterdir()) == []


def test_readme_mobilenetv2_search_typo_names_the_fix(tmp_path):
    r = invoke("meta_search_exp.py", *shlex.split(README_SEARCH_MBV2), cwd=tmp_path)
    assert_one_line_error(r, "--flops-arch", "'--flops -arch'")
    fixed = README_SEARCH_MBV2.replace("--flops -arch", "--flops-arch")
    cfg = dry_run("meta_search_exp.py", *shlex.split(fixed), cwd=tmp_path)
    assert cfg["flops"] == 85 and cfg["epochs"] == 20 and cfg["flops_arch"] == "mobilenetv2_prunednet"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MobileNetV2 PruningNet trained for one epoch on generated images."""
    work = tmp_path_factory.mktemp("search")
    make_image_folder(work / "img", num_classes=3, train_per_class=14, val_per_class=3, size=24)
    r = invoke("meta_trainer_exp.py", "--arch", "mobilenetv2_pruningnet", "--epochs", "1", *TINY_DATA, cwd=work)
    assert r.returncode == 0, r.stderr
    return work


@pytest.fixture
def work(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path


def search(work, *args):
    r = invoke("meta_search_exp.py", "--arch", "mobilenetv2_pruningnet", "--resume",
               f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar", *TINY_DATA, *SMALL, *args, cwd=work)
    assert r.returncode == 0, r.stderr
    return r


def budget_mmac(fraction: float) -> float:
    costs = cost_model("mobilenetv2", 24, 3, 0.125, True)
    return round(costs(get_family("mobilenetv2").layout.full()).macs * fraction / 1e6, 3)


def test_tiny_search_end_to_end(work):
    flops = budget_mmac(0.5)
    search(work, "--flops", str(flops), "--epochs", "2")
    path = work / CKPT / f"MetaPruneSearch_mobilenetv2_pruningnet_flops{flops}_checkpoint.pth.tar"
    state = torch.load(path, weights_only=True)
    assert state["arch"] == "mobilenetv2_pruningnet" and state["iter"] == 2
    cands = state["candidates"]
    assert len(cands) == 6 + 6 and all(len(c) == 27 for c in cands)  # 2 iterations x population, gene + error
    errors = [c[-1] for c in cands]
    assert errors == sorted(errors) and all(0 <= e <= 100 for e in errors)
    assert all(c[8] == -1 for c in cands)  # last_conv kept full width
    costs = cost_model("mobilenetv2", 24, 3, 0.125, True)
    layout = get_family("mobilenetv2").layout
    for c, macs in zip(cands, state["macs"]):
        assert costs(layout.parse(c)).macs == macs <= flops * 1e6
    log = (work / "logs" / f"MetaPruneSearch_mobilenetv2_pruningnet_flops{flops}.txt").read_text()
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
    assert get_family("mobilenetv2").layout.format(tuple(state["gene"])) == best[:-1]
    assert state["best_top1"] == pytest.approx(100 - best[-1], abs=1e-3)
    assert state["channels"][-1]["layer"] == "classifier"
    monkeypatch.chdir(work)  # the sub-validation split file lives under the run's working directory
    data = get_data("imagenet", "img", 24, val_per_class=4)
    top1 = evaluate(net, make_loader(data.subval, 8, False, 0), torch.device("cpu"))["top1"]
    assert top1 == pytest.approx(state["best_top1"])  # the exported weights reproduce the search's score


def test_search_is_deterministic_and_resume_equals_uninterrupted(work):
    search(work, "--epochs", "3", "--suffix", "_a", "--log", "logs/a.txt")
    straight = torch.load(work / CKPT / "MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar",
                          weights_only=True)
    search(work, "--epochs", "1", "--log", "logs/b.txt")
    cut = work / CKPT / "MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar"
    assert torch.load(cut, weights_only=True)["iter"] == 1
    search(work, "--epochs", "3", "--search-resume", str(cut), "--log", "logs/b.txt")
    resumed = torch.load(cut, weights_only=True)
    assert resumed["iter"] == 3 and resumed["candidates"] == straight["candidates"]
    assert resumed["state"] == straight["state"]


def test_retrain_candidate_from_search(work):
    search(work, "--epochs", "1")
    path = f"{CKPT}/MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar"
    cands = torch.load(work / path, weights_only=True)["candidates"]
    r = invoke("meta_trainer_exp.py", "--arch", "mobilenetv2_prunednet", "--search-resume", path, "--candidate", "1",
               "--epochs", "1", "--inherit", *TINY_DATA, cwd=work)
    assert r.returncode == 0, r.stderr
    state = checkpoint.load(work / CKPT / "imagenet_mobilenetv2_prunednet_flops0_best.pth.tar")
    assert get_family("mobilenetv2").layout.format(tuple(state["gene"])) == cands[1][:-1]
    r = invoke("meta_trainer_exp.py", "--arch", "mobilenetv2_prunednet", "--search-resume", path, "--candidate", "99",
               *TINY_DATA, cwd=work)
    assert_one_line_error(r, "--candidate 99", "holds 6 candidates")


@pytest.mark.parametrize("args, words", [
    (["--flops", "0.001"], ["budget cannot be met", "--flops 0.00 MMac is below the narrowest gene's"]),
    (["--min-flops", "1000"], ["--min-flops", "above the full gene"]),
    (["--params", "0.0001"], ["--params"]),
])
def test_infeasible_budget_is_immediate_error(work, args, words):
    r = invoke("meta_search_exp.py", "--arch", "mobilenetv2_pruningnet", "--resume",
               f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar", *TINY_DATA, *SMALL, *args, cwd=work)
    assert_one_line_error(r, *words)
    assert not list((work / CKPT).glob("MetaPruneSearch_*")) and not list((work / "logs").glob("MetaPruneSearch_*"))


def test_wrong_checkpoint_kinds_are_named(work):
    pruning = f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
    r = invoke("meta_search_exp.py", "--arch", "mobilenetv2_pruningnet", "--search-resume", pruning, *TINY_DATA,
               cwd=work)
    assert_one_line_error(r, "a model checkpoint", "not a search checkpoint")
    r = invoke("meta_search_exp.py", "--arch", "resnet50_pruningnet", "--resume", pruning, *TINY_DATA, cwd=work)
    assert_one_line_error(r, "holds mobilenetv2_pruningnet")


def test_latency_table_build_and_budget(work):
    base = ["--arch", "mobilenetv2_pruningnet", "--resume", f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar",
            *TINY_DATA, *SMALL]
    r = invoke("meta_search_exp.py", *base, "--latency", "5", cwd=work)
    assert_one_line_error(r, "no latency table", "--build-lut")
    r = invoke("meta_search_exp.py", *base, "--build-lut", "--lut-repeats", "3", cwd=work)
    assert r.returncode == 0, r.stderr
    lut_path = next((work / CKPT).glob("latency_mobilenetv2_cpu_24px_w0.125_bs1.json"))
    table = latency.LatencyTable.load(lut_path)
    assert len(table.validation) == 10 and all(v["lut_ms"] > 0 and v["measured_ms"] > 0 for v in table.validation)
    assert "mean |error|" in r.stdout
    assert not list((work / CKPT).glob("MetaPruneSearch_*"))  # building the table alone runs no search
    spec = checkpoint.build_model(checkpoint.load(work / CKPT / "imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar")).spec
    layout = spec.layout
    full_ms, narrow_ms = table(layout.full(), spec.bases), table(layout.narrowest(), spec.bases)
    assert narrow_ms < full_ms
    budget = round((full_ms + narrow_ms) / 2, 4)
    search(work, "--latency", str(budget), "--epochs", "2")
    state = torch.load(work / CKPT / "MetaPruneSearch_mobilenetv2_pruningnet_flops0_checkpoint.pth.tar",
                       weights_only=True)
    assert state["budget"]["latency"] == budget
    assert all(table(layout.parse(c), spec.bases) <= budget for c in state["candidates"])
