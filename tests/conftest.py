import contextlib
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Iterator

# One thread per process: tests run servers and torchrun workers beside the test process, and
# oversubscribed OpenMP threads make small ops tens of times slower.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


@contextlib.contextmanager
def global_state_kept(seed: int | None = 0) -> Iterator[None]:
    """Put back the process-wide state an in-process run of an entry script sets: deterministic
    algorithms, cuDNN flags, thread count, the working folder, environment variables, signal handlers;
    and start from torch seed ``seed`` (unless None), so that no test draws what an earlier one left."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    threads, cwd, env = torch.get_num_threads(), os.getcwd(), dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if seed is not None:
        torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        torch.set_num_threads(threads)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for s, handler in handlers.items():
            signal.signal(s, handler)


@pytest.fixture(autouse=True)
def _clean_global_state() -> Iterator[None]:
    """Every test starts from the same process-wide state, whichever tests ran before it."""
    with global_state_kept():
        yield


def pytest_addoption(parser) -> None:
    parser.addoption("--reverse", action="store_true", help="run the tests in reversed order (with -p no:randomly)")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--reverse"):
        items.reverse()


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Name the seed of pytest-randomly's order even under -q, so that a failure found in one order can be
    repeated."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order: random, seed {seed}; repeat it with --randomly-seed={seed}")


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


def make_work(folder: Path) -> Path:
    from data.synthetic import make_image_folder

    make_image_folder(folder / "img", num_classes=3, train_per_class=12, val_per_class=4, size=24)
    return folder


@pytest.fixture
def work(tmp_path):
    """A scratch working folder holding a tiny generated ImageFolder, ``img/`` (3 classes)."""
    return make_work(tmp_path)


@pytest.fixture(scope="session")
def pruningnet_once(tmp_path_factory) -> Path:
    """A ``work`` folder after one epoch of a tiny MobileNetV2 PruningNet, trained once for the session."""
    from helpers import train

    folder = make_work(tmp_path_factory.mktemp("pruningnet"))
    train(folder, "--arch", "mobilenetv2_pruningnet", "--epochs", "1")
    return folder


@pytest.fixture
def trained(tmp_path, pruningnet_once) -> Path:
    """``work`` as ``meta_trainer_exp.py --arch mobilenetv2_pruningnet --epochs 1`` left it (a copy)."""
    shutil.copytree(pruningnet_once, tmp_path, dirs_exist_ok=True)
    return tmp_path


def random_gene(layout, rng: random.Random) -> tuple[int, ...]:
    """A random valid gene: every free position uniform over 0..30."""
    return tuple(30 if i in layout.fixed else rng.randrange(31) for i in range(len(layout)))
