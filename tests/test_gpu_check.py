"""scripts/gpu_check.sh: one line and exit 0 without a GPU; its path checks, run on the CPU, all pass."""
import json
import os
import subprocess

from conftest import ROOT


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    r = run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("gpu_check: no CUDA GPU visible") and len(r.stdout.strip().splitlines()) == 1


def test_the_path_checks_pass_on_the_cpu(tmp_path):
    out = tmp_path / "table.json"
    r = run("--device", "cpu", "--json", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    results = {row["what"]: row["result"] for row in rows}
    assert results["fp32 checkpoint resumed under fp16"] == "ok"
    assert results["--deterministic, second run: the same weights"] == "ok"
    assert results["retrain its best candidate with --inherit"] == "ok"
    assert results["torchrun with more processes than GPUs"] == "skipped"
    assert results["crop-aware PruningNet training equals dense SGD"] == "ok"
    assert [r for r in results.values() if r != "skipped"] and set(results.values()) <= {"ok", "skipped"}
    assert "| what | result | time or value | detail |" in r.stdout  # the one table
