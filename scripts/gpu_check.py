"""Every CUDA path once on generated data, then the GPU's throughput: one table, exit 1 if a path failed.

Run from the repository root after ``./setup.sh``: ``scripts/gpu_check.sh`` (this file, on CUDA 0).
Without a CUDA GPU it says so in one line and exits 0. ``--device cpu`` runs the same path checks
on the CPU at the same tiny size (the CUDA-only ones are skipped), which is how the test suite
checks this script. ``--json FILE`` also writes the table as JSON.

Paths: PruningNet and PrunedNet training on ``--gpu 0``; ``--amp fp16`` with its GradScaler,
resumed, and a checkpoint without fp16 resumed under it; ``--amp bf16`` (or its refusal on a GPU
without bf16 tensor cores); ``--channels-last``; ``--deterministic`` (two runs, the same weights);
BN recalibration without host syncs; a search with a latency table measured on this GPU;
retraining its best candidate with ``--inherit``; with two GPUs torchrun over NCCL with
``--sync-bn``; torchrun with more processes than GPUs (a one-line refusal). Measurements: the
PruningNet's training images/s at 224 px, full width, ResNet50 and MobileNetV2, fp32 and bf16 (fp16
without bf16 tensor cores), each with and without channels-last, with peak GPU memory and host syncs per step
(``torch.cuda.set_sync_debug_mode``); candidates/min of search scoring (224 px, BN recalibration
on 20 batches of 100, top-1 on 5,000 images decoded once), with host syncs per candidate. Crop-aware
PruningNet training is checked against dense SGD in lockstep, and measured beside the dense path.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent

import torch

CKPT = Path("checkpoints/meta_prune")
MBV2_GENE = "[7,4,5,7,6,3,9,11,-1,19,4,9,11,9,9,6,10,3,6,3,7,5,17,8,8,11]"


@dataclass
class Row:
    what: str
    result: str  # ok, FAILED, skipped
    value: str
    detail: str = ""


class Checks:
    """Runs the entry scripts on generated data in a scratch folder and collects one row each."""

    def __init__(self, work: Path, device: str, timeout: float) -> None:
        self.work, self.device, self.timeout, self.rows = work, device, timeout, []
        self.dev = ["--gpu", "0"] if device == "cuda" else ["--cpu"]
        # on the CPU the runs check paths only, and the smallest network that has every layer type will do
        size = ["--input-size", "32", "--width-mult", "0.25"] if device == "cuda" else ["--input-size", "24",
                                                                                        "--width-mult", "0.125"]
        self.data = ["--dataset", "imagenet", "--data-root", "img", *size, "--batch-size", "16", "--workers", "2",
                     "--val-per-class", "4", "--vis-interval", "5"]

    def command(self, what: str, argv: list[str], expect_rc: int = 0, expect: str | None = None,
                check: Callable[[], str] | None = None) -> bool:
        """Run ``python argv`` (or ``-m torch.distributed.run``) in the scratch folder; ok when it exits with
        ``expect_rc``, its output holds ``expect`` and ``check`` (which returns a detail) raises nothing."""
        began = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, *argv], cwd=self.work, capture_output=True, text=True,
                               timeout=self.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            out = r.stdout + r.stderr
            if r.returncode != expect_rc or (expect is not None and expect not in out):
                want = f"exit {expect_rc}" + (f" and '{expect}'" if expect else "")
                tail = " | ".join(line for line in out.strip().splitlines()[-3:])
                return self.add(what, "FAILED", began, f"wanted {want}, got exit {r.returncode}: {tail[-400:]}")
            detail = check() if check is not None else ""
        except subprocess.TimeoutExpired:
            return self.add(what, "FAILED", began, f"no answer within {self.timeout:.0f} s")
        except Exception as e:  # a failed check is a row of the table, not the end of the run
            return self.add(what, "FAILED", began, f"{type(e).__name__}: {e}"[:400])
        return self.add(what, "ok", began, detail)

    def inline(self, what: str, fn: Callable[[], str]) -> bool:
        """Run ``fn`` in this process; its return value is the row's detail."""
        began = time.perf_counter()
        try:
            detail = fn()
        except Exception as e:
            traceback.print_exc()
            return self.add(what, "FAILED", began, f"{type(e).__name__}: {e}"[:400])
        return self.add(what, "ok", began, detail)

    def add(self, what: str, result: str, began: float, detail: str) -> bool:
        self.rows.append(Row(what, result, f"{time.perf_counter() - began:.1f} s", detail))
        print(f"[{result}] {what} {detail}", flush=True)
        return result == "ok"

    def skip(self, what: str, why: str) -> None:
        self.rows.append(Row(what, "skipped", "", why))
        print(f"[skipped] {what}: {why}", flush=True)

    def trainer(self, *args: str) -> list[str]:
        return [str(ROOT / "meta_trainer_exp.py"), *self.data, "--recal-batches", "2", *args]


def same_weights(a: Path, b: Path) -> str:
    """Two checkpoints hold bit-identical model tensors."""
    from app import checkpoint

    x, y = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    different = [k for k in x if not torch.equal(x[k], y[k])]
    if different:
        raise AssertionError(f"{len(different)} of {len(x)} tensors differ, e.g. {different[0]}")
    return f"{len(x)} tensors bit-identical"


PN = ["--arch", "mobilenetv2_pruningnet", "--epochs", "1"]
RUN = ["-m", "torch.distributed.run", "--standalone"]


def ckpt(suffix: str) -> str:
    return str(CKPT / f"imagenet_mobilenetv2_pruningnet{suffix}_checkpoint.pth.tar")


def training_and_search(c: Checks, gpus: int) -> None:
    """fp32 training, its checkpoint under fp16, a search with a latency table, --inherit retraining."""
    if not c.command("PruningNet training, fp32, --valuate", c.trainer(*PN, *c.dev, "--valuate", "--suffix", "_fp32")):
        return
    c.command("fp32 checkpoint resumed under fp16", c.trainer(*PN, *c.dev, "--amp", "fp16", "--suffix", "_fp32",
                                                             "--epochs", "2", "--resume", ckpt("_fp32")),
              expect="loss scale starts afresh")
    search = [str(ROOT / "meta_search_exp.py"), "--arch", "mobilenetv2_pruningnet", *c.data, "--recal-batches", "2",
              "--population", "8", "--select-num", "2", "--mutation-num", "2", "--crossover-num", "2", "--epochs", "2",
              "--resume", ckpt("_fp32")]
    if c.command("search with a latency table measured here",
                 [*search, *c.dev, "--build-lut", "--lut-repeats", "3", "--latency", "1000"],
                 expect="best PrunedNet exported"):
        c.command("retrain its best candidate with --inherit",
                  c.trainer("--arch", "mobilenetv2_prunednet", "--epochs", "1", *c.dev, "--search-resume",
                            str(CKPT / "MetaPruneSearch_mobilenetv2_pruningnet_flops0_latency1000_checkpoint.pth.tar"),
                            "--candidate", "0", "--inherit"))
    if gpus >= 2:
        c.command("torchrun search, 2 GPUs", [*RUN, "--nproc-per-node", "2", *search, "--suffix", "_ddp"])


def precision_and_layout(c: Checks, bf16: bool) -> None:
    """fp16 with its GradScaler and resumed, bf16 (or its refusal), channels-last."""
    if c.command("fp16 with GradScaler", c.trainer(*PN, *c.dev, "--amp", "fp16", "--suffix", "_fp16")):
        c.command("fp16 checkpoint resumed under fp16", c.trainer(*PN, *c.dev, "--amp", "fp16", "--suffix", "_fp16",
                                                                 "--epochs", "2", "--resume", ckpt("_fp16")))
    if bf16:
        c.command("bf16", c.trainer(*PN, *c.dev, "--amp", "bf16", "--suffix", "_bf16"))
    else:
        c.command("bf16 refused without bf16 tensor cores", c.trainer(*PN, *c.dev, "--amp", "bf16"), expect_rc=2,
                  expect="use --amp fp16")
    amp = ["--amp", "bf16" if bf16 else "fp16"]
    c.command("channels-last PruningNet", c.trainer(*PN, *c.dev, "--channels-last", *amp, "--suffix", "_cl"))
    c.command("channels-last PrunedNet", c.trainer("--arch", "mobilenetv2_prunednet", "--gene", MBV2_GENE,
                                                   "--epochs", "1", *c.dev, "--channels-last", *amp))


def determinism_and_processes(c: Checks, gpus: int) -> None:
    """--deterministic twice, trainer_exp.py, torchrun over NCCL, torchrun with too many processes."""
    det = [c.trainer(*PN, *c.dev, "--deterministic", "--suffix", f"_det{i}") for i in (1, 2)]
    if c.command("--deterministic, first run", det[0]):
        c.command("--deterministic, second run: the same weights", det[1],
                  check=lambda: same_weights(c.work / ckpt("_det1"), c.work / ckpt("_det2")))
    c.command("trainer_exp.py PrunedNet", [str(ROOT / "trainer_exp.py"), *c.data, "--arch", "resnet50_prunednet",
                                           "--epochs", "1", *c.dev])
    if c.device != "cuda":
        c.skip("torchrun over NCCL with --sync-bn", "no CUDA")
        c.skip("torchrun with more processes than GPUs", "no CUDA")
        return
    if gpus >= 2:
        c.command("torchrun, 2 GPUs, NCCL, --sync-bn",
                  [*RUN, "--nproc-per-node", "2", *c.trainer(*PN, "--sync-bn", "--suffix", "_ddp")])
    else:
        c.skip("torchrun, 2 GPUs, NCCL, --sync-bn", f"{gpus} GPU visible")
    c.command("torchrun with more processes than GPUs", [*RUN, f"--nproc-per-node={gpus + 1}", *c.trainer(*PN)],
              expect_rc=1, expect=f"LOCAL_RANK {gpus}: this node has {gpus} visible CUDA GPU")


def path_checks(work: Path, device: str, timeout: float, jobs: int, gpus: int, bf16: bool) -> list[Row]:
    """Three independent lanes of script runs (in parallel, ``jobs`` at a time), then the in-process checks."""
    lanes = [lambda c: training_and_search(c, gpus), lambda c: precision_and_layout(c, bf16),
             lambda c: determinism_and_processes(c, gpus)]
    checks = [Checks(work, device, timeout) for _ in lanes]
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda lane, c: lane(c), lanes, checks))
    inline = Checks(work, device, timeout)
    inline.inline("BN recalibration without host syncs", lambda: recalibration(device))
    inline.inline("fused SGD: an fp16 first step skipped by GradScaler", lambda: skipped_first_step(device))
    inline.inline("crop-aware PruningNet training equals dense SGD", lambda: crop_lockstep(device))
    return [row for c in (*checks, inline) for row in c.rows]


def count_syncs(fn: Callable[[], object]) -> int:
    """How many times ``fn`` makes the host wait for the GPU (torch.cuda.set_sync_debug_mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def recalibration(device: str) -> str:
    """BN recalibration of a materialized candidate on the device, with no host sync, equal to the CPU's."""
    from models import create_model, recalibrate_bn

    torch.manual_seed(0)
    net = create_model("mobilenetv2_pruningnet", num_classes=10, width_mult=0.5)
    gene = net.spec.layout.narrowest()
    batches = [torch.randn(16, 3, 64, 64) for _ in range(3)]
    reference = recalibrate_bn(net.materialize(gene), batches)
    net.to(device)
    pruned = net.materialize(gene)
    on_device = [x.to(device) for x in batches]
    if device == "cuda":
        syncs = count_syncs(lambda: recalibrate_bn(pruned, on_device))
        if syncs:
            raise AssertionError(f"{syncs} host syncs")
    else:
        recalibrate_bn(pruned, on_device)
    for (name, a), b in zip(pruned.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    return "0 host syncs; statistics equal to the CPU's"


def training_row(arch: str, device: torch.device, size: int, batch: int, steps: int, amp: str | None,
                 channels_last: bool, dense: bool = False) -> Row:
    """Images/s, peak memory and host syncs per step of the training scripts' PruningNet step (crop-aware,
    or with ``dense`` the ``--dense-generator-update`` path)."""
    from app.engine import gene_for_step
    from benchmarks.throughput import training_step

    what = f"PruningNet training, {arch}, full width, {size} px, batch {batch}" + (f", {amp}" if amp else "") \
        + (", channels-last" if channels_last else "") + (", --dense-generator-update" if dense else "")
    torch.cuda.reset_peak_memory_stats(device)
    trainer, net = training_step(arch, device, size, 1.0, amp, channels_last, dense_generator_update=dense)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step(i: int) -> None:
        trainer.train_step(x, y, (gene_for_step(net.spec.layout, 0, i),))

    for i in range(2):
        step(i)  # warmup
    times = []
    for i in range(2, 2 + steps):
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        step(i)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    syncs = count_syncs(lambda: [step(i) for i in range(100, 104)]) / 4
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return Row(what, "ok", f"{batch / statistics.median(times):.1f} img/s",
               f"peak {peak:.1f} GiB, {syncs:g} host syncs per step")


def scoring_row(arch: str, device: torch.device, size: int, evals: int, candidates: int) -> Row:
    """Candidates/min of search scoring on decoded sets held on the GPU, and host syncs per candidate."""
    from data import DecodedBatches
    from data.folder import MEAN, STD, Normalize
    from models import create_model
    from search.evaluator import CandidateEvaluator

    torch.manual_seed(0)
    net = create_model(f"{arch}_pruningnet", num_classes=1000).to(device).eval()
    images = lambda n: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)  # noqa: E731
    norm = Normalize(MEAN, STD)
    evaluator = CandidateEvaluator(net, DecodedBatches(images(2000), None, 100, device, norm),
                                   DecodedBatches(images(evals), torch.randint(0, 1000, (evals,), device=device), 100,
                                                  device, norm), device)
    rng = random.Random(0)
    genes = [net.spec.layout.sample(rng) for _ in range(candidates + 2)]
    evaluator.top1(genes[0])  # warmup
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    for g in genes[1:-1]:
        evaluator.top1(g)
    torch.cuda.synchronize(device)
    rate = 60 * candidates / (time.perf_counter() - began)
    syncs = count_syncs(lambda: evaluator.top1(genes[-1]))
    return Row(f"search scoring, {arch}, full width, {size} px, BN recal 20x100, top-1 on {evals:,} images",
               "ok", f"{rate:.1f} candidates/min", f"{syncs} host syncs per candidate")


def crop_lockstep(device: str) -> str:
    """Crop-aware training against dense SGD in lockstep (``tests/crop_lockstep.py``), plain and scaled."""
    sys.path.insert(0, str(ROOT / "tests"))  # the lockstep harness is the tests' own
    from crop_lockstep import lockstep
    from models import list_families

    steps = 20 if device == "cuda" else 3  # on the CPU a path check: tests/test_crop_sgd.py is the real one there
    worst = max(max(lockstep(family, nesterov=True, steps=steps, scaled=scaled, device=torch.device(device)).values())
                for family in list_families() for scaled in (False, True))
    if worst > 1e-5:
        raise AssertionError(f"{worst:.2g} apart")
    return f"weights, momentum and generated weights within {worst:.1g} of dense SGD's"


def skipped_first_step(device: str) -> str:
    """The training optimizer (fused SGD) under GradScaler: an overflowed first step is skipped
    without a trace, and the next steps equal plain SGD's."""
    import copy

    from app.engine import build_optimizer
    from models import create_model

    torch.manual_seed(0)
    net = create_model("resnet50_prunednet", num_classes=5, width_mult=0.25, small_input=True).to(device)
    reference = copy.deepcopy(net)
    fused = build_optimizer(net, lr=0.1, momentum=0.9, weight_decay=1e-4)
    plain = torch.optim.SGD([{"params": [p for p in reference.parameters() if p.ndim > 1], "weight_decay": 1e-4},
                             {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                            lr=0.1, momentum=0.9, foreach=False)
    x = torch.randn(8, 3, 32, 32, device=device)
    for model, opt in ((net, fused), (reference, plain)):
        scaler = torch.amp.GradScaler(device)
        for overflow in (True, False, False):
            opt.zero_grad()
            with torch.autocast(device, dtype=torch.float16):
                loss = model(x).float().logsumexp(1).mean() * (float("inf") if overflow else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    for (name, a), b in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return "weights equal to plain SGD's after an overflowed first step"


def measurements(device: torch.device, bf16: bool, quick: bool) -> list[Row]:
    """PruningNet training throughput, memory and syncs; search scoring rate. A failure is a row."""
    from models import list_families

    size, batch, steps = (64, 8, 2) if quick else (224, 64, 8)
    jobs = []
    for arch in list_families():
        low = "bf16" if bf16 else "fp16"
        for amp, cl in [(None, False), (None, True), (low, False), (low, True)]:
            jobs.append((f"PruningNet training, {arch}, {amp or 'fp32'}{', channels-last' if cl else ''}",
                         lambda arch=arch, amp=amp, cl=cl: training_row(arch, device, size, batch, steps, amp, cl)))
        jobs.append((f"PruningNet training, {arch}, fp32, --dense-generator-update",
                     lambda arch=arch: training_row(arch, device, size, batch, steps, None, False, dense=True)))
        jobs.append((f"search scoring, {arch}",
                     lambda arch=arch: scoring_row(arch, device, size, 500 if quick else 5000, 2 if quick else 4)))
    rows = []
    for what, job in jobs:
        try:
            rows.append(job())
        except Exception as e:
            traceback.print_exc()
            rows.append(Row(what, "FAILED", "", f"{type(e).__name__}: {e}"[:400]))
        print(f"[{rows[-1].result}] {rows[-1].what} {rows[-1].value} {rows[-1].detail}", flush=True)
        torch.cuda.empty_cache()
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| what | result | time or value | detail |", "|---|---|---|---|"]
    lines += [f"| {r.what} | {r.result} | {r.value} | {r.detail.replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="small throughput settings (a smoke run of the script)")
    p.add_argument("--timeout", type=float, default=300, help="seconds each path check may take")
    p.add_argument("--jobs", type=int, default=3, help="path checks run at the same time (three lanes at most)")
    p.add_argument("--json", default=None, help="also write the table here as JSON")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              f"nothing to check")
        return 0
    from data.synthetic import make_image_folder

    began = time.perf_counter()
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        header = f"{name} (compute capability {major}.{minor}), {gpus} visible"
        bf16 = major >= 8
    else:
        header, bf16 = "CPU only (path checks; CUDA-only checks skipped)", True
    print(f"gpu_check on {header}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        make_image_folder(work / "img", num_classes=4, train_per_class=20, val_per_class=4, size=40)
        rows = path_checks(work, args.device, args.timeout, args.jobs, gpus, bf16)
    if args.device == "cuda":
        rows += measurements(torch.device("cuda", 0), bf16, args.quick)
    print(f"\ngpu_check: {header}; torch {torch.__version__}; {time.perf_counter() - began:.0f} s; "
          f"command: scripts/gpu_check.sh {' '.join(sys.argv[1:])}".rstrip())
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": header, "torch": torch.__version__,
                                               "rows": [asdict(r) for r in rows]}, indent=1))
    failed = [r.what for r in rows if r.result == "FAILED"]
    if failed:
        print(f"gpu_check: {len(failed)} failed: {'; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
