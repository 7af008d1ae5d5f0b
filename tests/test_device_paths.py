"""The CUDA/NCCL paths, checked on the CPU wherever they run there: mixed-precision resume, device
and process checks, host syncs in the training step, BN recalibration, materialization, RNG per
rank, memory-mapped loads and the search's decoded image sets."""
import copy
import gc
import types
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Subset

import app.engine
import data.folder
import meta_trainer_exp
from app import checkpoint, distributed
from app.config import parse_args
from app.distributed import Dist
from app.engine import Trainer, process_seed
from conftest import random_gene
from data import DecodedBatches, get_data, make_loader
from helpers import SPLITS, TINY_DATA, TINY_TRAIN, invoke, train
from models import create_model, recalibrate_bn
from search.evaluator import CandidateEvaluator, search_evaluator
from utils.cli import UserError

CKPT = "checkpoints/meta_prune"
PRUNING = ["--arch", "mobilenetv2_pruningnet"]


# --- mixed precision -------------------------------------------------------------------------------

def test_resume_under_fp16_of_a_checkpoint_without_fp16_restarts_the_loss_scale(trained, monkeypatch):
    work = trained  # one fp32 epoch
    ckpt = work / CKPT / "imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
    r = train(work, *PRUNING, "--epochs", "2", "--amp", "fp16", "--resume", str(ckpt))
    assert "trained with --amp none, this run uses --amp fp16; the fp16 loss scale starts afresh at 65536" in r.stdout
    saved = checkpoint.load(ckpt)["scaler"]
    assert saved["scale"] > 0 and checkpoint.load(ckpt)["config"]["amp"] == "fp16"
    # an fp16 checkpoint resumed under fp16 goes on with its loss scale
    scales, original = [], Trainer.train_one_epoch
    monkeypatch.setattr(Trainer, "train_one_epoch", lambda self, stop: scales.append(self.scaler.get_scale())
                        or original(self, stop))
    r = train(work, *PRUNING, "--epochs", "3", "--amp", "fp16", "--resume", str(ckpt))
    assert scales == [saved["scale"]] and "afresh" not in r.stdout
    # and back to fp32: the scale is dropped, the run goes on
    r = train(work, *PRUNING, "--epochs", "4", "--resume", str(ckpt))
    assert "trained with --amp fp16, this run uses --amp none" in r.stdout


@pytest.mark.parametrize("capability, refused", [((7, 0), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_on_a_gpu_without_bf16_tensor_cores_is_refused(monkeypatch, capability, refused):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    cuda = torch.device("cuda", 0)
    if refused:
        with pytest.raises(UserError, match=r"--amp bf16: Tesla V100-SXM2-32GB \(compute capability 7.0\).*"
                                            r"use --amp fp16"):
            distributed.check_amp("bf16", cuda)
    else:
        distributed.check_amp("bf16", cuda)
    distributed.check_amp("fp16", cuda)
    distributed.check_amp("bf16", torch.device("cpu"))  # the CPU's bf16 is what it is


def test_the_generator_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    net = create_model("resnet50_pruningnet", num_classes=5, width_mult=0.125, small_input=True)
    gene = net.spec.layout.narrowest()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = net.generate(gene)
        out = net(torch.randn(2, 3, 16, 16), gene)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert out.dtype == torch.bfloat16  # the convs themselves still run in bf16
    reference = net.generate(gene)
    assert all(torch.equal(w, reference[name]) for name, w in weights.items())  # the fp32 weights made outside


def test_an_fp16_first_step_skipped_by_the_grad_scaler_leaves_sgd_exact():
    # fp16's first steps usually overflow; fused SGD must then start as plain SGD would
    torch.manual_seed(0)
    net = create_model("resnet50_prunednet", num_classes=5, width_mult=0.125, small_input=True)
    reference = copy.deepcopy(net)
    fused = app.engine.build_optimizer(net, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    plain = torch.optim.SGD([{"params": [p for p in reference.parameters() if p.ndim > 1], "weight_decay": 1e-4},
                             {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    x = torch.randn(4, 3, 16, 16)
    for model, opt in ((net, fused), (reference, plain)):
        scaler = torch.amp.GradScaler("cpu")
        for overflow in (True, False, False):
            opt.zero_grad()
            loss = model(x).logsumexp(1).mean() * (float("inf") if overflow else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    for (name, a), b in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def fake_losses(monkeypatch, losses: list[float]) -> None:
    """The training step reports these losses, one per step (the step itself still runs)."""
    original, steps = Trainer.train_step, iter(losses)

    def step(self, x, y, gene):
        loss, hits = original(self, x, y, gene)
        return torch.full_like(loss, next(steps)), hits

    monkeypatch.setattr(Trainer, "train_step", step)


def test_fp16_steps_with_a_non_finite_loss_are_skipped_and_logged(work, monkeypatch):
    fake_losses(monkeypatch, [1.0, float("inf"), 1.5])
    r = train(work, *PRUNING, "--epochs", "1", "--amp", "fp16")
    assert "1 fp16 step(s) with a non-finite loss skipped by the GradScaler (the last at epoch 0 step 1)" in r.stdout
    assert "loss 1.2500" in r.stdout  # the mean over the two steps with a finite loss


def test_fp16_loss_that_stays_non_finite_stops_training(work, monkeypatch):
    monkeypatch.setattr(app.engine, "FP16_OVERFLOW_STEPS", 2)
    fake_losses(monkeypatch, [1.0, float("inf"), float("nan")])
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, *PRUNING, "--epochs", "1", "--amp", "fp16", cwd=work)
    assert r.returncode == 1 and "the fp16 training loss has been non-finite for 2 steps in a row" in r.stderr


def test_without_fp16_one_non_finite_loss_stops_training(work, monkeypatch):
    fake_losses(monkeypatch, [1.0, float("inf"), 1.0])
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, *PRUNING, "--epochs", "1", "--amp", "bf16", cwd=work)
    assert r.returncode == 1 and "the training loss became non-finite at epoch 0 step 1" in r.stderr
    assert "no checkpoint was written yet: start the run again" in r.stderr  # none claimed before the first save


# --- processes and devices -------------------------------------------------------------------------

def torchrun_env(monkeypatch, rank: int, local_rank: int, world: int) -> None:
    for key, value in {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": local_rank}.items():
        monkeypatch.setenv(key, str(value))


def test_more_processes_than_visible_gpus_is_one_line(monkeypatch):
    torchrun_env(monkeypatch, rank=3, local_rank=3, world=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device on a GPU that is not there"))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined the job"))
    args = types.SimpleNamespace(gpu=None, cpu=False, amp=None, dist_timeout=180.0)
    with pytest.raises(UserError, match=r"LOCAL_RANK 3: this node has 2 visible CUDA GPU\(s\).*--nproc-per-node 2"):
        distributed.setup(args, fixed_shapes=False)


@pytest.mark.parametrize("minutes", [180.0, 7.5])
def test_the_process_group_waits_as_long_as_dist_timeout(monkeypatch, minutes):
    torchrun_env(monkeypatch, rank=0, local_rank=0, world=2)
    joined = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: joined.update(kw, b=backend))
    parsed = parse_args(meta_trainer_exp.get_args_parser(), ["--arch", "resnet50_pruningnet", "--cpu"]
                        + ([] if minutes == 180.0 else ["--dist-timeout", str(minutes)]))
    distributed.setup(parsed, fixed_shapes=False)
    assert joined["b"] == "gloo" and joined["timeout"] == timedelta(minutes=minutes)


def test_a_non_positive_dist_timeout_is_one_line(work):
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "resnet50_pruningnet", "--dist-timeout", "0", cwd=work)
    assert r.returncode == 2 and "--dist-timeout must be a positive number of minutes" in r.stderr


@pytest.mark.parametrize("script, arch, flags, autotuned", [
    ("meta_trainer_exp.py", "resnet50_pruningnet", [], False),
    ("meta_trainer_exp.py", "resnet50_prunednet", [], True),
    ("meta_trainer_exp.py", "resnet50_prunednet", ["--deterministic"], False),
    ("trainer_exp.py", "resnet50_prunednet", [], True),
])
def test_cudnn_autotuning_only_where_conv_shapes_are_fixed(work, monkeypatch, script, arch, flags, autotuned):
    seen, original = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, state=None: seen.append(torch.backends.cudnn.benchmark)
                        or original(self, state))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not autotuned)
    r = invoke(script, *(TINY_DATA if script == "trainer_exp.py" else TINY_TRAIN), "--arch", arch, "--epochs", "1",
               *flags, cwd=work)
    assert r.returncode == 0, r.stderr
    assert seen == [autotuned]


def test_the_search_autotunes_cudnn(trained, monkeypatch):
    work = trained
    seen, original = [], CandidateEvaluator.top1
    monkeypatch.setattr(CandidateEvaluator, "top1", lambda self, g: seen.append(torch.backends.cudnn.benchmark)
                        or original(self, g))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    r = invoke("meta_search_exp.py", "--arch", "mobilenetv2_pruningnet", "--resume",
               f"{CKPT}/imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar", *TINY_DATA, "--population", "4",
               "--select-num", "2", "--mutation-num", "1", "--crossover-num", "1", "--recal-batches", "2",
               "--epochs", "1", cwd=work)
    assert r.returncode == 0, r.stderr
    assert seen and all(seen)


# --- no host syncs in the step ---------------------------------------------------------------------

# Tensor methods that make the host wait for a GPU (they read device memory), and factories that
# copy host values to a device.
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class HostReads(TorchFunctionMode):
    """Records every call that would make the host wait for a GPU, while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.active, self.calls = True, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if self.active and (name in READS or (name == "tensor" and "device" in kwargs)):
            self.calls.append(name)
        return func(*args, **kwargs)


@pytest.fixture
def host_reads(monkeypatch):
    """Audits training steps: the data loader (host work) and the sync points are left out."""
    mode = HostReads()

    def paused(fn):
        def run(*args, **kwargs):
            mode.active = False
            try:
                return fn(*args, **kwargs)
            finally:
                mode.active = True
        return run

    def loader(iterable, **kwargs):
        it = paused(iter)(iterable)
        while True:
            try:
                batch = paused(next)(it)
            except StopIteration:
                return
            yield batch

    monkeypatch.setattr(app.engine, "progress", loader)
    for name in ("sync_point", "log_step", "save"):
        monkeypatch.setattr(Trainer, name, paused(getattr(Trainer, name)))
    monkeypatch.setattr(Trainer, "end_epoch", paused(Trainer.end_epoch))
    original = Trainer.train_one_epoch

    def audited(self, stop):
        with mode:
            return original(self, stop)

    monkeypatch.setattr(Trainer, "train_one_epoch", audited)
    return mode


@pytest.mark.parametrize("amp", [None, "fp16"])
def test_training_steps_never_wait_for_the_device_between_sync_points(work, host_reads, amp):
    # 3 steps, one sync point (the epoch's last step): every step is audited
    r = train(work, "--arch", "resnet50_pruningnet", "--epochs", "1", "--vis-interval", "10",
              *(["--amp", amp] if amp else []))
    assert "loss" in r.stdout
    assert host_reads.calls == []


def test_the_audit_sees_a_host_read(work, host_reads, monkeypatch):
    original = Trainer.train_step

    def reads_the_loss(self, x, y, gene):
        loss, hits = original(self, x, y, gene)
        loss.item()
        return loss, hits

    monkeypatch.setattr(Trainer, "train_step", reads_the_loss)
    train(work, "--arch", "resnet50_pruningnet", "--epochs", "1", "--vis-interval", "10")
    assert host_reads.calls == ["item"] * 3


def test_a_non_finite_loss_between_sync_points_is_found_before_anything_is_saved(work):
    args = ["--arch", "mobilenetv2_pruningnet", "--epochs", "2", "--vis-interval", "3", "--suffix", "_nan"]
    train(work, *args[:2], "--epochs", "1", "--suffix", "_nan")
    ckpt = work / CKPT / "imagenet_mobilenetv2_pruningnet_nan_checkpoint.pth.tar"
    good = ckpt.read_bytes()
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, *args, "--lr", "1e30", "--resume", str(ckpt), cwd=work)
    assert r.returncode == 1 and "the training loss became non-finite at epoch 1 step" in r.stderr, r.stderr
    assert f"the last good checkpoint {ckpt.relative_to(work)} is kept: --resume it" in r.stderr
    assert ckpt.read_bytes() == good  # the epoch's end (a save) came after the check


# --- BN recalibration and materialization ----------------------------------------------------------

def trained_statistics(net: nn.Module) -> None:
    """Give every BN non-trivial running statistics and a non-zero batch counter, as training does."""
    net.train()
    with torch.no_grad():
        for i in range(4):
            net(torch.randn(6, 3, 16, 16) * (1 + i) + i)


def test_recalibration_replaces_trained_statistics_by_exact_averages():
    torch.manual_seed(0)
    net = create_model("resnet50_prunednet", num_classes=5, width_mult=0.125, small_input=True)
    trained_statistics(net)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.num_batches_tracked == 4 for m in bns)
    inputs = {m: [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs[m].append(a[0].detach().clone())) for m in bns]
    batches = [torch.randn(5, 3, 16, 16) * 2 + 1 for _ in range(3)]
    recalibrate_bn(net, batches)
    for h in hooks:
        h.remove()
    for m in bns:
        # by hand: the mean of the batch means and of the unbiased batch variances, over (N, H, W)
        flat = [x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs[m]]
        mean = sum(f.mean(1) for f in flat) / len(flat)
        var = sum(f.var(1, unbiased=True) for f in flat) / len(flat)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
        assert m.num_batches_tracked == 3 and m.momentum == 0.1
    assert not net.training


def test_recalibration_equals_pytorchs_cumulative_average_without_reading_the_device():
    torch.manual_seed(0)
    net = create_model("mobilenetv2_prunednet", num_classes=5, width_mult=0.25, small_input=True)
    trained_statistics(net)
    reference = copy.deepcopy(net)
    batches = [torch.randn(4, 3, 16, 16) + i for i in range(5)]
    reads = HostReads()
    with reads:
        recalibrate_bn(net, batches)
    assert reads.calls == []
    # PyTorch's own cumulative average (momentum None), which reads the batch counter on the host
    ref_bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in ref_bns:
        m.reset_running_stats()
        m.momentum = None
    reference.train()
    with torch.no_grad():
        for x in batches:
            reference(x)
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_materialize_builds_on_the_pruningnets_device_without_drawing_random_numbers(rng):
    torch.manual_seed(0)
    net = create_model("resnet50_pruningnet", num_classes=5, width_mult=0.125, small_input=True)
    gene = random_gene(net.spec.layout, rng)
    before = torch.get_rng_state()
    pruned = net.materialize(gene)
    assert torch.equal(torch.get_rng_state(), before)
    # every tensor set from the PruningNet: generated convs, its BN statistics, unit BN affine
    weights, targets = net.generate(gene), pruned.conv_bns()
    assert list(weights) == list(targets) == [c.name for c in net.spec.convs()]
    for name, m in targets.items():
        assert torch.equal(m.conv.weight, weights[name])
        assert torch.equal(m.bn.weight, torch.ones_like(m.bn.weight))
        assert torch.equal(m.bn.bias, torch.zeros_like(m.bn.bias))
    for gconv in net.convs.values():
        m, src = targets[gconv.spec.name], gconv.bns[str(gene[gconv.spec.out_slot])]
        assert torch.equal(m.bn.running_mean, src.running_mean) and torch.equal(m.bn.running_var, src.running_var)
    assert torch.equal(pruned.classifier.weight, net.classifier.weight)
    assert all(t.device == net.scales.device for t in pruned.state_dict().values())


# --- RNG per process -------------------------------------------------------------------------------

def test_every_process_takes_up_its_own_rng_state():
    states = []
    for rank in range(2):
        torch.manual_seed(process_seed(0, rank))
        states.append({"torch": torch.get_rng_state()})
    assert not torch.equal(states[0]["torch"], states[1]["torch"])  # dropout masks differ between ranks
    logged = []
    trainer = types.SimpleNamespace(dist=Dist(1, 2, 1), device=torch.device("cpu"), args=types.SimpleNamespace(seed=0),
                                    epoch=3, steps=10, step_in_epoch=4,
                                    logger=types.SimpleNamespace(info=logged.append))
    torch.manual_seed(123)
    Trainer.resume_rng(trainer, states)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"]) and logged == []
    # with another number of processes, each restarts from the seed of (seed, rank, step)
    trainer.dist = Dist(0, 3, 0)
    Trainer.resume_rng(trainer, states)
    expected = torch.Generator().manual_seed(process_seed(0, 0, 34)).get_state()
    assert torch.equal(torch.get_rng_state(), expected) and "RNG states of 2 process(es)" in logged[0]


# --- memory-mapped checkpoints ---------------------------------------------------------------------

def mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(str(path) in line for line in f)


def test_checkpoints_load_memory_mapped_when_asked(tmp_path):
    path = tmp_path / "c.pth.tar"
    record = checkpoint.model_record("resnet50_prunednet", None, 3, 0.125, True)
    checkpoint.save({"format": checkpoint.FORMAT, "kind": checkpoint.MODEL, **record, "model": {"w": torch.randn(1000)}},
                    path)
    state = checkpoint.load(path, mmap=True)
    assert mapped(path)
    del state
    gc.collect()
    assert not mapped(path)
    state = checkpoint.load(path)
    assert not mapped(path) and state["model"]["w"].shape == (1000,)


def test_resume_maps_the_checkpoint_and_lets_go_of_its_weights(trained, monkeypatch):
    work = trained
    ckpt = work / CKPT / "imagenet_mobilenetv2_pruningnet_checkpoint.pth.tar"
    loaded, original = [], checkpoint.load

    def load(path, *args, **kwargs):
        state = original(path, *args, **kwargs)
        loaded.append((state, mapped(ckpt)))
        return state

    monkeypatch.setattr(checkpoint, "load", load)
    during, fit = [], Trainer.train_one_epoch
    monkeypatch.setattr(Trainer, "train_one_epoch", lambda self, stop: during.append(set(loaded[0][0]))
                        or fit(self, stop))
    train(work, "--arch", "mobilenetv2_pruningnet", "--epochs", "2", "--resume", str(ckpt))
    assert loaded[0][1]  # mapped, not read
    assert during and not {"model", "optimizer"} & during[0]  # dropped once restored, before training


# --- the search's image sets, decoded once ---------------------------------------------------------

def test_search_scoring_decodes_every_image_once_and_scores_as_streaming_does(work, monkeypatch, rng):
    monkeypatch.chdir(work)
    bundle = get_data("imagenet", "img", 24, val_per_class=4, split_dir=SPLITS)
    torch.manual_seed(0)
    net = create_model("mobilenetv2_pruningnet", num_classes=3, width_mult=0.125, small_input=True)
    opened, original = [], data.folder.Image.open
    monkeypatch.setattr(data.folder.Image, "open", lambda path, *a: opened.append(path) or original(path, *a))
    decoded = search_evaluator(net, bundle, recal_batches=2, batch_size=4, seed=0, device=torch.device("cpu"))
    assert isinstance(decoded.eval_batches, DecodedBatches) and decoded.eval_batches.images.dtype == torch.uint8
    assert len(opened) == 12 + 8  # the sub-validation split and the recalibration images, once each
    genes = [random_gene(net.spec.layout, rng) for _ in range(3)]
    scores = [decoded.top1(g) for g in genes]
    assert len(opened) == 20  # no image decoded again for any candidate
    # the same images streamed through the float transforms, decoded again for every candidate
    order = torch.randperm(len(bundle.train_eval), generator=torch.Generator().manual_seed(0))[:8].tolist()
    recal = [x for x, _ in DataLoader(Subset(bundle.train_eval, order), batch_size=4)]
    streamed = CandidateEvaluator(net, recal, make_loader(bundle.subval, 4, False, 0), torch.device("cpu"))
    assert scores == [streamed.top1(g) for g in genes]
    assert len(opened) == 20 + 3 * 12 + 8
