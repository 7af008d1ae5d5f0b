"""experiments/imagenet/paper/: every row of MetaPruning's results tables as a chain of commands whose
files connect (PruningNet → search → retraining of candidate 0, and the uniform baseline)."""
import argparse
import json

import pytest

from app import checkpoint
from app.config import run_files
from conftest import ROOT
from data.synthetic import make_image_folder
from helpers import dry_run, invoke
from models import get_family
from models.cost import cost_model
from search import record

PAPER = ROOT / "experiments/imagenet/paper"
# the MetaPruning rows of the official README's tables: (family, row)
ROWS = [("resnet50", "2.0G"), ("resnet50", "1.0G"), ("mobilenetv2", "303M"), ("mobilenetv2", "140M"),
        ("mobilenetv2", "43M")]


def resolved(script: str, path, tmp_path, *extra: str) -> argparse.Namespace:
    return argparse.Namespace(**dry_run(script, "--json", str(path), *extra, cwd=tmp_path))


def chain(family: str, row: str, tmp_path) -> dict[str, argparse.Namespace]:
    steps = {"pruningnet": ("meta_trainer_exp.py", f"{family}_pruningnet.json"),
             "search": ("meta_search_exp.py", f"{family}_{row}_search.json"),
             "retrain": ("meta_trainer_exp.py", f"{family}_{row}_retrain.json"),
             "uniform": ("meta_trainer_exp.py", f"{family}_{row}_uniform.json")}
    return {step: resolved(script, PAPER / name, tmp_path) for step, (script, name) in steps.items()}


@pytest.mark.parametrize("family, row", ROWS)
def test_each_rows_files_connect(family, row, tmp_path):
    c = chain(family, row, tmp_path)
    trained, _ = run_files(c["pruningnet"])
    assert c["search"].resume == str(trained)  # the search scores with the PruningNet's last checkpoint
    searched = record.search_files(c["search"])
    assert c["retrain"].search_resume == str(searched.checkpoint) and c["retrain"].candidate == 0
    outputs = [run_files(c[s])[0] for s in ("pruningnet", "retrain", "uniform")] + [searched.checkpoint]
    assert len(set(outputs)) == 4  # no step writes another step's files
    assert c["retrain"].arch == c["uniform"].arch == f"{family}_prunednet"
    # the searched and the uniform network retrain with one recipe
    where = ("gene", "search_resume", "candidate", "suffix", "json")
    recipe = [{k: v for k, v in vars(c[step]).items() if k not in where} for step in ("retrain", "uniform")]
    assert recipe[0] == recipe[1]


def test_no_two_rows_share_an_output(tmp_path):
    outputs = set()
    for family, row in ROWS:
        c = chain(family, row, tmp_path)
        for step in ("retrain", "uniform"):
            assert run_files(c[step])[0] not in outputs
            outputs.add(run_files(c[step])[0])
        searched = record.search_files(c["search"])
        assert searched.checkpoint not in outputs
        outputs.add(searched.checkpoint)


@pytest.mark.parametrize("family, row", ROWS)
def test_the_uniform_baseline_is_the_widest_uniform_gene_within_the_rows_budget(family, row, tmp_path):
    c = chain(family, row, tmp_path)
    layout, costs = get_family(family).layout, cost_model(family, 224, 1000)
    budget = c["search"].flops * 1e6
    gene = layout.parse(c["uniform"].gene)
    free = {gene[i] for i in layout.free_positions()}
    assert len(free) == 1 and costs(gene).macs <= budget  # uniform, within the budget
    wider = layout.validate([30 if i in layout.fixed else gene[0] + 1 for i in range(len(layout))])
    assert costs(wider).macs > budget  # and the widest such


def test_the_official_resnet50_1g_model_fits_its_rows_window(tmp_path):
    # the official code's shipped ResNet50 gene (resnet/evaluating/resnet.py) is the paper's 1.0G model
    search = resolved("meta_search_exp.py", PAPER / "resnet50_1.0G_search.json", tmp_path)
    official = get_family("resnet50").layout.parse([19, 9, 15, 13, 10, 9, 10, 6, 9, 13, 11, 12, 7, 18, 7, 13, 12, 10,
                                                    19, 18])
    macs = cost_model("resnet50", 224, 1000)(official).macs / 1e6
    assert search.min_flops <= macs <= search.flops


def test_a_rows_chain_runs_end_to_end_under_its_own_names(tmp_path):
    """MobileNetV2 43M, small: width, input size, steps and search sizes overridden on the command line."""
    make_image_folder(tmp_path / "img", num_classes=3, train_per_class=14, val_per_class=3, size=24)
    small = ["--data-root", "img", "--width-mult", "0.125", "--input-size", "24", "--batch-size", "8", "--workers", "0",
             "--val-per-class", "4"]
    train_small = [*small, "--epochs", "1", "--steps-per-epoch", "2", "--recal-batches", "2", "--no-visdom"]
    steps = [("meta_trainer_exp.py", "mobilenetv2_pruningnet.json", train_small),
             ("meta_search_exp.py", "mobilenetv2_43M_search.json",
              [*small, "--width-mult", "0.125", "--population", "4", "--select-num", "2", "--mutation-num", "1",
               "--crossover-num", "1", "--epochs", "1", "--recal-batches", "2", "--recal-batch-size", "8"]),
             ("meta_trainer_exp.py", "mobilenetv2_43M_retrain.json", train_small),
             ("meta_trainer_exp.py", "mobilenetv2_43M_uniform.json", train_small)]
    for script, name, extra in steps:
        r = invoke(script, "--json", str(PAPER / name), *extra, cwd=tmp_path)
        assert r.returncode == 0, f"{name}: {r.stderr}"
    ckpt = tmp_path / "checkpoints/meta_prune"
    retrained = checkpoint.load(ckpt / "imagenet_mobilenetv2_prunednet_flops43_paper_best.pth.tar")
    searched = checkpoint.load(ckpt / "MetaPruneSearch_mobilenetv2_pruningnet_flops43_paper_checkpoint.pth.tar")
    assert get_family("mobilenetv2").layout.format(tuple(retrained["gene"])) == searched["candidates"][0][:-1]
    uniform = checkpoint.load(ckpt / "imagenet_mobilenetv2_prunednet_uniform43M_paper_best.pth.tar")
    assert uniform["gene"] == list(get_family("mobilenetv2").layout.parse(
        json.loads((PAPER / "mobilenetv2_43M_uniform.json").read_text())["gene"]))
    assert retrained["config"]["depthwise_decay"] is False and retrained["config"]["dropout"] == 0
