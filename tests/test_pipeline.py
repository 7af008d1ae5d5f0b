"""The README main job (pipeline.py --quick) end to end on generated Fashion-MNIST files."""
import json

import pytest
import torch

import pipeline
from app import checkpoint
from data import get_data, make_loader
from data.synthetic import make_fashion_mnist
from models import get_family, list_families
from models.cost import cost_model


@pytest.mark.parametrize("arch", list_families())
def test_quick_pipeline_searches_retrains_and_reports(arch, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = make_fashion_mnist(tmp_path / "fm", train_per_class=40, test_per_class=5)
    summary = pipeline.main(["--quick", "--arch", arch, "--data-root", str(root), "--out", "run", "--cpu"])

    run = tmp_path / "run"
    summary = json.loads((run / "results.json").read_text())  # what a user reads; checked against other sources
    layout, costs = get_family(arch).layout, cost_model(arch, 32, 10, pipeline.QUICK.width, False)
    budget = summary["budget_mmac"] * 1e6
    assert budget == pytest.approx(0.25 * costs(layout.full()).macs, rel=1e-3)
    searched, uniform = summary["results"]
    assert (searched["network"], uniform["network"]) == ("searched", "uniform")

    search = torch.load(run / f"checkpoints/meta_prune/MetaPruneSearch_{arch}_pruningnet_flops"
                              f"{summary['budget_mmac']}_checkpoint.pth.tar", weights_only=True)
    assert searched["gene"] == search["candidates"][0][:-1]  # the search's best is what got retrained
    free = layout.free_positions()
    uniform_id = uniform["gene"][free[0]]
    assert {uniform["gene"][p] for p in free} == {uniform_id}
    wider = [30 if p in layout.fixed else uniform_id + 1 for p in range(len(layout))]
    assert costs(layout.parse(wider)).macs > budget  # the widest uniform network within the budget
    for row in (searched, uniform):
        gene = layout.parse(row["gene"])
        assert costs(gene).macs <= budget and row["mmac"] == round(costs(gene).macs / 1e6, 3)
        assert 0 <= row["top1"] <= 100 and row["retrain_s"] > 0
        final = json.loads((run / f"logs/fashionmnist_{arch}_prunednet_{row['network']}25.jsonl")
                           .read_text().splitlines()[-1])
        assert round(final["val_top1"], 2) == row["top1"]
        # and by hand: the retrained network's argmax over the Fashion-MNIST test images
        state = checkpoint.load(run / f"checkpoints/meta_prune/fashionmnist_{arch}_prunednet_{row['network']}25"
                                      f"_checkpoint.pth.tar")
        assert state["config"]["cpu"]  # --cpu reached the stage: on a GPU machine too, this test means the CPU
        net = checkpoint.build_model(state).eval()
        test_set = get_data("fashionmnist", str(root), state["config"]["input_size"], hold_out=False).val
        with torch.no_grad():
            right = sum(int((net(x).argmax(1) == y).sum()) for x, y in make_loader(test_set, 64, False, 0))
        assert round(100 * right / len(test_set), 2) == row["top1"]

    plots = sorted(p.name for p in (run / "plots").iterdir())
    assert plots == sorted([f"fashionmnist_{arch}_pruningnet_training.png",
                            f"MetaPruneSearch_{arch}_pruningnet_flops{summary['budget_mmac']}_search.png"])
    assert all((run / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    out = capsys.readouterr().out
    assert f"| searched | {searched['top1']:.2f} | {searched['mmac']:.2f} |" in out
    assert f"| uniform | {uniform['top1']:.2f} | {uniform['mmac']:.2f} |" in out
