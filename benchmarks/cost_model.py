"""Cost-model speed: genes costed per second on one CPU core (target ≥ 20,000 for ResNet50).

Run: ``.venv/bin/python benchmarks/cost_model.py`` (pins torch to one thread; the cost model is pure
Python). Prints one JSON line per arch: scalar ``CostModel.__call__`` and vectorized ``batch`` rates.
"""
from __future__ import annotations

import json
import platform
import random
import time

import numpy as np
import torch

from models import get_family, list_families
from models.cost import cost_model


def rate(fn, n: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main() -> None:
    torch.set_num_threads(1)
    for arch in list_families():
        layout, model, rng = get_family(arch).layout, cost_model(arch), random.Random(0)
        genes = [layout.sample(rng) for _ in range(20000)]
        arr = np.array(genes)
        scalar = rate(lambda m=model, gs=genes: [m(g) for g in gs], len(genes))
        batch = rate(lambda m=model, a=arr: m.batch(a), len(genes))
        print(json.dumps({"arch": arch, "input_size": 224, "genes_per_s": round(scalar),
                          "batch_genes_per_s": round(batch), "cpu": platform.processor() or platform.machine(),
                          "python": platform.python_version()}))


if __name__ == "__main__":
    main()
