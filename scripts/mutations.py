"""Mutation check: each one-line bug below must make its test fail.

Run: ``.venv/bin/python scripts/mutations.py [N ...]`` (all, or the ones numbered from 0). Works on a scratch
copy of the checkout, so an interrupted run leaves the working tree as it was. Prints one line per
mutation, CAUGHT or MISSED, and exits 1 when any is missed.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (file, original text, mutated text, the test that must fail)
MUTATIONS = [
    ("models/pruningnet.py", "m.reset_running_stats()", "m.eval()",
     "tests/test_device_paths.py::test_recalibration_replaces_trained_statistics_by_exact_averages"),
    ("models/pruningnet.py", "        m.momentum = momentum\n",
     "        m.momentum = momentum\n        m.running_var.fill_(1)\n",
     "tests/test_device_paths.py::test_recalibration_replaces_trained_statistics_by_exact_averages"),
    ("utils/meters.py", "((above < k) & valid)", "((above < k + 1) & valid)",
     "tests/test_engine.py::test_topk_counts_of_hand_made_logits"),
    ("app/engine.py", "correct_topk(out, y, (1, 5))", "correct_topk(out, y, (2, 5))",
     "tests/test_engine.py::test_evaluate_counts_and_averages_over_batches_by_hand"),
    ("app/engine.py", "random.Random(seed * 1_000_003 + step)", "random.Random(seed * 1_000_003 + step % 100)",
     "tests/test_engine.py::test_genes_do_not_repeat_over_steps_or_epochs"),
    ("app/engine.py", "random.Random(seed * 1_000_003 + step)",
     "random.Random(seed * 1_000_003 + step + int(__import__('os').environ.get('RANK', 0)))",
     "tests/test_engine.py::test_the_gene_of_a_step_is_a_function_of_seed_and_step_alone"),
    ("app/engine.py", "0.5 * (1 + math.cos(math.pi * t))", "0.5 * (1 + math.cos(math.pi * t * 0.9))",
     "tests/test_engine.py::test_decay_factors"),
    ("app/engine.py", "return progress / self.warmup_epochs", "return 1.0",
     "tests/test_engine.py::test_warmup_rises_linearly_then_decay_spans_the_remaining_epochs"),
    ("app/engine.py", "if p.ndim > 1 and id(p) not in spared", "if p.ndim >= 1 and id(p) not in spared",
     "tests/test_engine.py::test_weight_decay_on_conv_and_linear_weights_only"),
    ("data/__init__.py", "order = order[: self.n - self.n % self.world]", "pass",
     "tests/test_engine.py::test_training_shards_are_disjoint_equal_and_cover_the_trimmed_epoch"),
    ("utils/files.py", "if _temp_owner_gone(stale):", "if False:",
     "tests/test_engine.py::test_saving_removes_temporary_files_of_dead_writers_only"),
    ("app/engine.py", 'if state.get("dataset") != args.dataset:', "if False:",
     "tests/test_engine.py::test_resume_check_names_what_differs"),
    ("models/gene.py", "if isinstance(v, bool) or not isinstance(v, int):", "if not isinstance(v, int):",
     "tests/test_gene.py::test_parse_errors_name_position_and_value"),
    ("search/latency.py", "self._ms.append(max(ms, self._ms[-1]) if self._ms else ms)", "self._ms.append(ms)",
     "tests/test_search.py::test_latency_calibration_maps_raw_sums_onto_measurements"),
    ("tests/conftest.py",
     "        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])\n", "",
     "tests/test_isolation.py::test_process_wide_state_is_put_back"),
    ("tests/helpers.py", "with global_state_kept(seed=None), contextlib.redirect_stdout(out)",
     "with contextlib.redirect_stdout(out)",
     "tests/test_isolation.py::test_an_in_process_run_puts_back_what_it_set"),
    ("tests/helpers.py", 'own = script not in ENTRY_SCRIPTS or "--cpu" in args or "--gpu" in args', "own = True",
     "tests/test_isolation.py::test_entry_scripts_run_on_the_cpu_where_cuda_is_present"),
    ("app/crop_sgd.py", "z.last[:cout, :cin] = self._steps + 1", "z.last[:cout, :cin] = self._steps",
     "tests/test_crop_sgd.py::test_the_training_script_trains_the_same_weights_on_either_path"),
]


def tracked_copy(dst: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files, as they are now, under ``dst``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("numbers", nargs="*", type=int, metavar="N",
                   help=f"mutations to run, 0..{len(MUTATIONS) - 1} (default: all)")
    chosen = set(p.parse_args(argv).numbers)  # argparse's choices would refuse the empty default
    if not chosen <= set(range(len(MUTATIONS))):
        p.error(f"mutations are numbered 0..{len(MUTATIONS) - 1}, got {sorted(chosen)}")
    missed = 0
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch)
        tracked_copy(copy)
        for i, (name, old, new, test) in enumerate(MUTATIONS):
            if chosen and i not in chosen:
                continue
            path = copy / name
            text = path.read_text()
            if old not in text:
                print(f"{i} STALE  {name}: {old.strip()!r} is no longer in the file; update this list")
                missed += 1
                continue
            path.write_text(text.replace(old, new, 1))
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:randomly", test],
                                   cwd=copy, capture_output=True, text=True, timeout=900)
            finally:
                path.write_text(text)
            caught = r.returncode == 1  # failed tests; 0 passed (missed), anything else is an error to look at
            missed += not caught
            summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
            print(f"{i} {'CAUGHT' if caught else 'MISSED'} {name}: {old.strip()!r} -> {new.strip()!r} | {test} | "
                  f"{summary}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
