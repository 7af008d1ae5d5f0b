"""Shared test helpers: run the entry scripts as a user would, from a scratch working directory."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, global_state_kept
from utils import cli

# --cpu: the scripts default to CUDA 0 where there is one; these tests mean the CPU (gloo, CPU timings,
# bit-exact CPU results) on every machine. scripts/gpu_check.sh is where the CUDA paths run.
TINY_DATA = ["--dataset", "imagenet", "--data-root", "img", "--width-mult", "0.125", "--input-size", "24",
             "--batch-size", "8", "--workers", "0", "--val-per-class", "4", "--cpu"]
TINY_TRAIN = TINY_DATA + ["--recal-batches", "2"]
SPLITS = Path("checkpoints/meta_prune/splits")  # where the scripts keep split files, under the working folder
ENTRY_SCRIPTS = {"meta_trainer_exp.py", "meta_search_exp.py", "trainer_exp.py"}


def on_cpu(script: str, args: tuple[str, ...]) -> list[str]:
    """``args`` with ``--cpu`` for an entry script, unless it names its device itself."""
    own = script not in ENTRY_SCRIPTS or "--cpu" in args or "--gpu" in args
    return list(args) if own else [*args, "--cpu"]


def run_script(script: str, *args: str, cwd: Path, check: bool = True, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python ROOT/script args`` in ``cwd`` (outside the checkout, as a user may)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run([sys.executable, str(ROOT / script), *on_cpu(script, args)], cwd=cwd, capture_output=True,
                       text=True, env=full_env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def invoke(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run an entry script's ``main`` in this process (fast), as ``python script args`` would from ``cwd``.

    What the run sets process-wide (``--deterministic``, cuDNN flags, signal handlers, the working
    folder) is put back afterwards, also when a fixture of a wider scope calls it."""
    module = importlib.import_module(str(Path(script).with_suffix("")).replace("/", "."))
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with global_state_kept(seed=None), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            os.chdir(cwd)
            cli.run_script(module.main, on_cpu(script, args))
    except SystemExit as e:
        code = e.code
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def train(work: Path, *args: str) -> subprocess.CompletedProcess:
    """``meta_trainer_exp.py`` on the tiny data in ``work``, which must succeed."""
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, *args, cwd=work)
    assert r.returncode == 0, r.stderr
    return r


def dry_run(script: str, *args: str, cwd: Path) -> dict:
    r = invoke(script, *args, "--dry-run", cwd=cwd)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def snapshot(root: Path) -> dict:
    """Every file under ``root`` and its bytes: equal before and after means nothing was written."""
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
