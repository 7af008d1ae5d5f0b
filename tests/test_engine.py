"""The engine's small pure pieces against answers computed by hand: top-k counts, evaluation, the
PruningNet's gene schedule, learning-rate factors, weight-decay groups, the epoch sampler, the
resume check and stale temporary files."""
import math
import os
import random
import re
import socket
import subprocess
import sys
import types
from collections import Counter

import pytest
import torch
from torch import nn

from app import checkpoint
from app.engine import LRSchedule, build_optimizer, check_resume, evaluate, gene_for_step
from data import EpochSampler
from models import create_model, get_family, list_families
from models.gene import FULL_ID
from utils.cli import UserError
from utils.meters import correct_topk

LOGITS = torch.tensor([[0.1, 0.9, 0.0],     # target 1: top-1
                       [0.8, 0.15, 0.05],   # target 1: second
                       [0.2, 0.3, 0.5],     # target 0: third
                       [0.4, 0.4, 0.2]])    # target 1: tied with class 0 for first
TARGETS = torch.tensor([1, 1, 0, 1])


def hits(ks, output=LOGITS, target=TARGETS) -> list[int]:
    return [int(c) for c in correct_topk(output, target, ks)]


def test_topk_counts_of_hand_made_logits():
    # ranks of the targets: 1, 2, 3, and 2 for the tie (a class scoring as high is ranked above)
    assert hits((1, 2, 3)) == [1, 3, 4]


def test_topk_with_k_beyond_the_classes_counts_every_finite_target():
    assert hits((5, 1000)) == [4, 4]


def test_topk_of_a_constant_output_is_zero_not_the_share_of_class_0():
    assert hits((1,), torch.zeros(6, 4), torch.tensor([0, 0, 0, 1, 2, 3])) == [0]


def test_topk_of_a_nan_target_score_is_a_miss():
    out = LOGITS.clone()
    out[0, 1] = float("nan")
    assert hits((1, 3)) == [1, 4] and hits((1, 3), out) == [0, 3]


def test_topk_of_an_empty_batch_is_zero():
    assert hits((1, 5), torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)) == [0, 0]


class Lookup(nn.Module):
    """A 'model' that returns preset logits, one tensor per call."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(self.outputs)


def test_evaluate_counts_and_averages_over_batches_by_hand():
    six = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]])
    batches = [(torch.zeros(4, 1), TARGETS), (torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)),
               (torch.zeros(3, 1), torch.tensor([0, 5, 0]))]
    out = evaluate(Lookup([LOGITS, torch.zeros(0, 6), six]), batches, torch.device("cpu"))
    # top-1: row 0 of LOGITS and row 0 of six; top-5: every LOGITS row (3 classes), six rows 0 and 1
    # (class 5 is sixth in row 1), row 2 has class 0 last
    assert out["top1"] == pytest.approx(100 * 2 / 7) and out["top5"] == pytest.approx(100 * 6 / 7)
    nll = [-math.log(math.exp(row[t]) / sum(math.exp(v) for v in row))
           for row, t in zip(LOGITS.tolist() + six.tolist(), TARGETS.tolist() + [0, 5, 0])]
    assert out["loss"] == pytest.approx(sum(nll) / 7)


LAYOUTS = {f: get_family(f + "_pruningnet").layout for f in list_families()}


@pytest.mark.parametrize("family", LAYOUTS)
def test_the_gene_of_a_step_is_a_function_of_seed_and_step_alone(family, monkeypatch):
    layout = LAYOUTS[family]
    first = [gene_for_step(layout, 7, s) for s in range(50)]
    random.seed(99)
    torch.manual_seed(99)  # the global RNGs, which a process's dropout moves, play no part
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [gene_for_step(layout, 7, s) for s in range(50)] == first
    assert [gene_for_step(layout, 8, s) for s in range(50)] != first


@pytest.mark.parametrize("family", LAYOUTS)
def test_genes_do_not_repeat_over_steps_or_epochs(family):
    layout = LAYOUTS[family]
    genes = [gene_for_step(layout, 0, s) for s in range(2000)]  # e.g. 20 epochs of 100 steps
    assert len(set(genes)) == len(genes)


@pytest.mark.parametrize("family", LAYOUTS)
def test_gene_ids_are_uniform_over_the_grid_and_fixed_slots_full(family):
    layout, n = LAYOUTS[family], 3100
    genes = [gene_for_step(layout, 3, s) for s in range(n)]
    for pos in range(len(layout)):
        counts = Counter(g[pos] for g in genes)
        if pos in layout.fixed:
            assert counts == {FULL_ID: n}
            continue
        assert set(counts) == set(range(FULL_ID + 1))  # every id reachable
        chi2 = sum((c - n / 31) ** 2 / (n / 31) for c in counts.values())
        assert chi2 < 80  # 30 degrees of freedom: exceeded with probability ~2e-6 by a uniform draw


def schedule(kind: str, warmup: float = 0) -> LRSchedule:
    return LRSchedule(kind, epochs=10, warmup_epochs=warmup)


@pytest.mark.parametrize("kind, progress, factor", [
    ("linear", 0.0, 1.0), ("linear", 2.5, 0.75), ("linear", 10.0, 0.0),
    ("cosine", 0.0, 1.0), ("cosine", 5.0, 0.5), ("cosine", 2.5, (1 + math.sqrt(0.5)) / 2), ("cosine", 10.0, 0.0),
])
def test_decay_factors(kind, progress, factor):
    assert schedule(kind).factor(progress) == pytest.approx(factor, abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_warmup_rises_linearly_then_decay_spans_the_remaining_epochs(kind):
    args = schedule(kind, warmup=2)
    assert [args.factor(p) for p in (0.5, 1.0, 2.0)] == pytest.approx([0.25, 0.5, 1.0])
    # the decay runs over epochs 2..10: a quarter of it done at epoch 4
    assert args.factor(4.0) == pytest.approx(0.75 if kind == "linear" else (1 + math.sqrt(0.5)) / 2)


def test_weight_decay_on_conv_and_linear_weights_only():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=4, bias=True),
                        nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = build_optimizer(net, lr=0.1, momentum=0.9, weight_decay=1e-4).param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[2].weight), id(net[4].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[1].weight), id(net[1].bias), id(net[0].bias),
                                                   id(net[2].bias), id(net[4].bias)}


def test_a_pruningnet_decays_its_generator_matrices_not_their_biases_or_bn():
    net = create_model("mobilenetv2_pruningnet", num_classes=3, width_mult=0.25, small_input=True)
    decay = {id(p) for p in build_optimizer(net, lr=0.1, momentum=0.9, weight_decay=1e-4).param_groups[0]["params"]}
    for name, p in net.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        bn = ".bn" in name or "bn." in name or name.startswith("bn")
        assert (id(p) in decay) == (leaf != "bias" and not bn and p.ndim > 1), name


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (7, 2)])
def test_training_shards_are_disjoint_equal_and_cover_the_trimmed_epoch(n, world):
    shards = []
    for rank in range(world):
        s = EpochSampler(n, shuffle=True, seed=5, rank=rank, world_size=world)
        s.set_epoch(2)
        shards.append(list(s))
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // world
    seen = [i for s in shards for i in s]
    assert len(set(seen)) == len(seen) == n - n % world
    one = EpochSampler(n, shuffle=True, seed=5)  # the permutation one process sees, trimmed and dealt round-robin
    one.set_epoch(2)
    assert shards == [list(one)[:n - n % world][r::world] for r in range(world)]


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2)])
def test_evaluation_shards_are_disjoint_and_cover_every_sample(n, world):
    seen = [i for r in range(world) for i in EpochSampler(n, shuffle=False, rank=r, world_size=world)]
    assert sorted(seen) == list(range(n))


def test_epochs_reshuffle_and_a_start_skips_exactly_that_many():
    s = EpochSampler(20, shuffle=True, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == sorted(e1) == list(range(20)) and e0 != e1
    s.set_start(6)
    assert list(s) == e1[6:] and len(s) == 14


def resume_state(**kw) -> dict:
    state = {"arch": "resnet50_prunednet", "gene": [1, 2], "dataset": "imagenet", "model_args": {"width_mult": 1.0},
             "config": {"input_size": 224, "batch_size": 8}, "optimizer": {}, "epoch": 1, "samples_in_epoch": 0}
    return {**state, **kw}


def resume_args(**kw) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{"resume": "ck.pth.tar", "dataset": "imagenet", "input_size": 224, "epochs": 5,
                                    "batch_size": 8, "depthwise_decay": True, **kw})


RECORD = {"arch": "resnet50_prunednet", "gene": [1, 2], "model_args": {"width_mult": 1.0}}


def test_resume_check_accepts_its_own_run():
    check_resume(resume_state(), RECORD, resume_args(), 1)


@pytest.mark.parametrize("state, args, words", [
    ({"dataset": "fashionmnist"}, {}, "trained on fashionmnist, this run's --dataset is imagenet"),
    ({"gene": [2, 2]}, {}, "gene [2, 2]"),
    ({"model_args": {"width_mult": 0.5}}, {}, "width_mult 0.5 (this run: 1.0)"),
    ({"config": {"input_size": 32}}, {}, "--input-size 32, not 224"),
    ({"epoch": 6}, {}, "trained 6 epochs, more than --epochs 5"),
    ({"samples_in_epoch": 12}, {}, "does not divide 12"),
])
def test_resume_check_names_what_differs(state, args, words):
    with pytest.raises(UserError, match=re.escape(words)):
        check_resume(resume_state(**state), RECORD, resume_args(**args), 1)


def test_resume_check_converts_positions_across_world_sizes():
    # 48 samples into the epoch: 6 steps of batch 8 on one process are 3 steps on two; five processes
    # take 40 samples a step and cannot stop at 48
    check_resume(resume_state(samples_in_epoch=48), RECORD, resume_args(), 2)
    with pytest.raises(UserError, match="on 5 process"):
        check_resume(resume_state(samples_in_epoch=48), RECORD, resume_args(), 5)


def test_saving_removes_temporary_files_of_dead_writers_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    host = socket.gethostname()
    stale = tmp_path / f".ck.pth.tar.{host}.{dead.pid}.abc.tmp"
    live = tmp_path / f".ck.pth.tar.{host}.{os.getpid()}.def.tmp"
    remote = tmp_path / f".ck.pth.tar.otherhost.{dead.pid}.ghi.tmp"
    for f in (stale, live, remote):
        f.write_bytes(b"partial")
    checkpoint.save({"x": torch.ones(1)}, tmp_path / "ck.pth.tar")
    assert not stale.exists() and live.exists() and remote.exists()
    assert torch.load(tmp_path / "ck.pth.tar", weights_only=True)["x"].item() == 1
