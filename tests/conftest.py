import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


def random_gene(layout, rng: random.Random) -> tuple[int, ...]:
    """A random valid gene: every free position uniform over 0..30."""
    return tuple(30 if i in layout.fixed else rng.randrange(31) for i in range(len(layout)))
