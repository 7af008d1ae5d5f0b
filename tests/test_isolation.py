"""The suite's isolation: what one test changes process-wide is put back before the next."""
import os
import signal

import pytest
import torch

from app import checkpoint
from conftest import global_state_kept
from helpers import TINY_TRAIN, invoke
from models import get_family


def test_process_wide_state_is_put_back(tmp_path):
    cwd, handler, cublas = os.getcwd(), signal.getsignal(signal.SIGTERM), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with global_state_kept():
        torch.use_deterministic_algorithms(not deterministic)  # what --deterministic does in an in-process run
        torch.backends.cudnn.benchmark = not benchmark
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = "set by a test"
        os.chdir(tmp_path)
        signal.signal(signal.SIGTERM, lambda *a: None)
        torch.randn(100)
    assert torch.are_deterministic_algorithms_enabled() == deterministic and torch.backends.cudnn.benchmark == benchmark
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == cublas and os.getcwd() == cwd
    assert signal.getsignal(signal.SIGTERM) is handler


def test_an_in_process_run_puts_back_what_it_set(work):
    """Also where no per-test fixture would: in a fixture of module or session scope."""
    assert not torch.are_deterministic_algorithms_enabled()  # the suite's state (conftest) before the run
    r = invoke("meta_trainer_exp.py", *TINY_TRAIN, "--arch", "mobilenetv2_prunednet", "--gene",
               str(list(get_family("mobilenetv2").layout.full())), "--epochs", "1", "--deterministic", cwd=work)
    assert r.returncode == 0, r.stderr
    assert not torch.are_deterministic_algorithms_enabled()


def test_every_test_starts_from_the_same_torch_seed():
    with global_state_kept():
        first = torch.randn(3)
    with global_state_kept():
        assert torch.equal(torch.randn(3), first)


def test_entry_scripts_run_on_the_cpu_where_cuda_is_present(work, monkeypatch):
    """On a GPU machine the scripts default to CUDA 0; the suite's runs ask for the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"the run picked {d}, not the CPU"))
    args = [a for a in TINY_TRAIN if a != "--cpu"]
    r = invoke("meta_trainer_exp.py", *args, "--arch", "mobilenetv2_prunednet", "--gene",
               str(list(get_family("mobilenetv2").layout.full())), "--epochs", "1",
               cwd=work)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(work / "checkpoints/meta_prune/imagenet_mobilenetv2_prunednet_best.pth.tar")["config"]["cpu"]


def test_every_planted_bug_of_the_mutation_check_still_has_its_line_and_its_test():
    """scripts/mutations.py plants each bug by replacing a line's text: a refactor that rewrites the line
    or renames the test would leave the check silently stale."""
    import ast
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("mutations", ROOT / "scripts" / "mutations.py")
    mutations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutations)
    for path, original, mutated, test in mutations.MUTATIONS:
        assert (ROOT / path).read_text().count(original) == 1, (path, original)
        assert original != mutated
        test_file, _, name = test.partition("::")
        tree = ast.parse((ROOT / test_file).read_text())
        assert name in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, test
