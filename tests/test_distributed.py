"""Real torchrun runs (2 processes, gloo on CPU): same genes everywhere, same results as 1 process."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app import checkpoint
from app.engine import gene_for_step, wrap_ddp
from conftest import ROOT
from data.synthetic import make_image_folder
from helpers import TINY_DATA, invoke, read_jsonl
from models import create_model, get_family

CKPT = "checkpoints/meta_prune"
TRAIN = ["--arch", "mobilenetv2_pruningnet", "--epochs", "1", "--lr", "0.05", "--vis-interval", "1",
         "--recal-batches", "2"]


def torchrun(script: str, *args: str, cwd, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / script), *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    make_image_folder(work / "img", num_classes=3, train_per_class=20, val_per_class=3, size=24)
    return work


def tiny(batch: int) -> list[str]:
    args = list(TINY_DATA)
    args[args.index("--batch-size") + 1] = str(batch)
    return args


@pytest.fixture(scope="module")
def runs(work):
    """The same 2-epoch PruningNet run on two processes (batch 4 each, a checkpoint every 2 steps) and on one
    (batch 8)."""
    torchrun("meta_trainer_exp.py", *TRAIN, *tiny(4), "--epochs", "2", "--save-every-steps", "2", "--suffix", "_ddp",
             cwd=work)
    r = invoke("meta_trainer_exp.py", *TRAIN, *tiny(8), "--epochs", "2", "--suffix", "_single", cwd=work)
    assert r.returncode == 0, r.stderr
    return work


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    ddp = [r for r in read_jsonl(runs / "logs/imagenet_mobilenetv2_pruningnet_ddp.jsonl") if r["kind"] == "step"]
    one = [r for r in read_jsonl(runs / "logs/imagenet_mobilenetv2_pruningnet_single.jsonl") if r["kind"] == "step"]
    assert len(ddp) == len(one) == 12  # 2 epochs of 48 training images / global batch 8; only rank 0 logs
    assert [r["gene"] for r in ddp] == [r["gene"] for r in one]  # the same gene every step, checked across ranks
    # BatchNorm sees 4 samples per process instead of 8, so losses agree closely but not exactly
    assert ddp[0]["loss"] == pytest.approx(one[0]["loss"], rel=0.05)
    assert sum(r["loss"] for r in ddp) == pytest.approx(sum(r["loss"] for r in one), rel=0.1)


def test_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path):
    shutil.copytree(runs, tmp_path, dirs_exist_ok=True)  # the module's runs stay as they are
    path = tmp_path / CKPT / "imagenet_mobilenetv2_pruningnet_ddp_checkpoint.pth.tar"
    state = checkpoint.load(path)
    assert state["world_size"] == 2 and state["epoch"] == 2
    # each process's own RNG state: their dropout masks differ
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    r = invoke("meta_trainer_exp.py", *TRAIN, *tiny(8), "--epochs", "3", "--suffix", "_ddp", "--resume", str(path),
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "the checkpoint holds the RNG states of 2 process(es), this run has 1" in r.stdout
    resumed = checkpoint.load(path)
    assert resumed["epoch"] == 3 and resumed["world_size"] == 1
    epochs = [r["epoch"] for r in read_jsonl(tmp_path / "logs/imagenet_mobilenetv2_pruningnet_ddp.jsonl")
              if r["kind"] == "epoch"]
    assert epochs == [1, 2, 3]


def test_distributed_search_equals_single_process(runs, tmp_path):
    shutil.copytree(runs, tmp_path, dirs_exist_ok=True)
    runs = tmp_path  # the module's runs stay as they are
    single = f"{CKPT}/imagenet_mobilenetv2_pruningnet_single_checkpoint.pth.tar"
    search = ["--arch", "mobilenetv2_pruningnet", "--resume", single,
              *tiny(8), "--population", "6", "--select-num", "2", "--mutation-num", "2", "--crossover-num", "2",
              "--recal-batches", "2", "--epochs", "2"]
    torchrun("meta_search_exp.py", *search, "--flops", "1.5", cwd=runs)
    r = invoke("meta_search_exp.py", *search, "--flops", "1.50", cwd=runs)
    assert r.returncode == 0, r.stderr
    two = torch.load(runs / CKPT / "MetaPruneSearch_mobilenetv2_pruningnet_flops1.5_checkpoint.pth.tar",
                     weights_only=True)
    one = torch.load(runs / CKPT / "MetaPruneSearch_mobilenetv2_pruningnet_flops1.50_checkpoint.pth.tar",
                     weights_only=True)
    assert two["candidates"] == one["candidates"] and len(one["candidates"]) == 12


def worker_pid(launcher: int, rank: int) -> int | None:
    """The PID of torchrun worker ``rank`` started by the launcher process ``launcher``."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(work):
    ckpt = work / CKPT / "imagenet_mobilenetv2_pruningnet_sig_checkpoint.pth.tar"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "meta_trainer_exp.py"), *TRAIN, *tiny(4), "--epochs", "50", "--save-every-steps", "1",
           "--suffix", "_sig"]
    launcher = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        end = time.time() + 120
        while not ckpt.exists():
            assert launcher.poll() is None and time.time() < end, launcher.communicate()[0][-3000:]
            time.sleep(0.1)
        os.kill(worker_pid(launcher.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 must learn of it
        out, _ = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert "stopped by signal 15" in (work / "logs/imagenet_mobilenetv2_pruningnet_sig.txt").read_text(), out[-3000:]
    state = checkpoint.load(ckpt)
    assert state["epoch"] < 50 and state["world_size"] == 2
    r = invoke("meta_trainer_exp.py", *TRAIN, *tiny(8), "--epochs", str(state["epoch"] + 1), "--suffix", "_sig",
               "--resume", str(ckpt), cwd=work)
    assert r.returncode == 0, r.stderr
    # one process goes on after the samples the two had seen (global batch 8 both ways, 6 steps per
    # epoch): every global step logged once, in order, each with the gene of its step
    layout = get_family("mobilenetv2").layout
    rows = read_jsonl(work / "logs/imagenet_mobilenetv2_pruningnet_sig.jsonl")
    steps = [(r["step"], layout.parse(r["gene"])) for r in rows if r["kind"] == "step"]
    assert steps == [(n, gene_for_step(layout, 0, n - 1)) for n in range(1, 6 * (state["epoch"] + 1) + 1)]


def test_pruningnet_ddp_keeps_gradients_in_its_buckets_and_broadcasts_no_buffers(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = create_model("mobilenetv2_pruningnet", num_classes=3, width_mult=0.125, small_input=True)
        ddp = wrap_ddp(net, torch.device("cpu"), pruningnet=True)
        assert not ddp.forward_sync_buffers  # thousands of per-scale BN buffers, never needed on the other ranks
        ddp(torch.randn(2, 3, 16, 16), net.spec.layout.full()).sum().backward()
        grads = [p.grad for p in net.parameters()]
        # views into DDP's buckets: many gradients share one storage, no second full-size copy
        assert len({g.untyped_storage().data_ptr() for g in grads}) < len(grads) / 10
        plain = create_model("mobilenetv2_prunednet", num_classes=3, width_mult=0.125, small_input=True)
        assert wrap_ddp(plain, torch.device("cpu"), pruningnet=False).forward_sync_buffers
    finally:
        torch.distributed.destroy_process_group()
