import os
import random
import sys
from pathlib import Path

# One thread per process: tests run servers and torchrun workers beside the test process, and
# oversubscribed OpenMP threads make small ops tens of times slower.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture
def work(tmp_path):
    """A scratch working folder holding a tiny generated ImageFolder, ``img/`` (3 classes)."""
    from data.synthetic import make_image_folder

    make_image_folder(tmp_path / "img", num_classes=3, train_per_class=12, val_per_class=4, size=24)
    return tmp_path


def random_gene(layout, rng: random.Random) -> tuple[int, ...]:
    """A random valid gene: every free position uniform over 0..30."""
    return tuple(30 if i in layout.fixed else rng.randrange(31) for i in range(len(layout)))
