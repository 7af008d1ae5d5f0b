"""PruningNet training, dense against crop-aware, beside the static floor, side by side in one process.

Run: ``.venv/bin/python benchmarks/crop_training.py [--device cpu|cuda] [--steps 6] [--rounds 2]``.
For ResNet50 and MobileNetV2 at full width (CPU: 64 px, batch 16, as the throughput suite; CUDA: 224 px,
batch 64), images/s of the training scripts' own step (``Trainer.train_step``, a fresh gene each step,
SGD momentum 0.9, weight decay 1e-4):

- dense: ``--dense-generator-update`` (full-size generator gradients, every element stepped);
- crop-aware: the default (``app/crop_sgd.py``);
- floor: a static PrunedNet of each of the same genes, built beforehand (the same convolutions,
  nothing generated), stepped by the same fused SGD.

The three alternate in ``--rounds`` rounds so that a slow spell of a shared machine hits them alike;
every rate is the median over all rounds' steps. Also the values a torchrun step all-reduces, dense
(every gradient) against crop-aware (the dense parameters and each generator's ``dw``), averaged
over 200 genes of the gene schedule. Writes ``benchmarks/results/crop_training_{device}.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from app.engine import gene_for_step
from benchmarks.throughput import device_name, save_result, sync, training_step
from models import create_model, get_family, list_families
from models.pruningnet import IMAGE_CHANNELS, IMAGE_SLOT


def timed_steps(step, genes: list, device: torch.device) -> list[float]:
    times = []
    for gene in genes:
        sync(device)
        t = time.perf_counter()
        step(gene)
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def reduced_values(net: torch.nn.Module, genes: list) -> tuple[float, float]:
    """Mean values all-reduced per step: every gradient (dense), or the parameters outside the generator
    matrices plus each conv's generated-weight gradient ``dw`` (crop-aware)."""
    matrices = [p for m in net.convs.values() for p in (m.weight2, m.bias2)]
    dense = sum(p.numel() for p in net.parameters())
    rest = dense - sum(p.numel() for p in matrices)
    crops = []
    for gene in genes:
        ch = net.spec.channels(gene)
        total = 0
        for m in net.convs.values():
            c = m.spec
            cin = 1 if c.depthwise else (IMAGE_CHANNELS if c.in_slot == IMAGE_SLOT else ch[c.in_slot])
            total += ch[c.out_slot] * cin * c.kernel * c.kernel
        crops.append(rest + total)
    return float(dense), statistics.mean(crops)


def measure(arch: str, device: torch.device, size: int, batch: int, steps: int, rounds: int) -> dict:
    layout = get_family(arch).layout
    genes = [gene_for_step(layout, 0, s) for s in range(steps + 1)]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    runners = {}
    for name, dense in (("dense", True), ("crop-aware", False)):
        trainer, _ = training_step(arch, device, size, 1.0, dense_generator_update=dense)
        runners[name] = lambda gene, t=trainer: t.train_step(x, y, (gene,))
    floors = {g: create_model(f"{arch}_prunednet", gene=g, num_classes=1000, small_input=False).to(device)
              for g in genes}
    floor_opt = {g: torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
                 for g, n in floors.items()}

    def floor_step(gene):
        opt = floor_opt[gene]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(floors[gene](x), y).backward()
        opt.step()

    runners["floor"] = floor_step
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, step in runners.items():
            times[name] += timed_steps(step, genes, device)[1:]  # the first step of a round warms up
    rates = {name: batch / statistics.median(t) for name, t in times.items()}
    with torch.device("meta"):  # shapes for the counts, no memory
        shapes = create_model(f"{arch}_pruningnet", num_classes=1000, small_input=False)
    dense_values, crop_values = reduced_values(shapes, [gene_for_step(layout, 0, s) for s in range(200)])
    return {"arch": arch, "setting": f"full width, {size}px, batch {batch}",
            "img_s": {k: round(v, 2) for k, v in rates.items()},
            "crop_vs_dense": round(rates["crop-aware"] / rates["dense"], 2),
            "crop_vs_floor": round(rates["crop-aware"] / rates["floor"], 3),
            "reduced_mvalues_per_step": {"dense": round(dense_values / 1e6, 2), "crop-aware": round(crop_values / 1e6, 2)},
            "reduced_crop_vs_dense": round(crop_values / dense_values, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=6, help="timed steps per net and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device(args.device)
    size, batch = (64, 16) if device.type == "cpu" else (224, 64)
    rows = [measure(arch, device, size, batch, args.steps, args.rounds) for arch in list_families()]
    result = {"device": device_name(device), "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows}
    save_result(args.out, f"crop_training_{device.type}.json", result)
    print(f"device: {result['device']}, torch {torch.__version__}")
    print("| arch | setting | dense img/s | crop-aware img/s | floor img/s | crop / dense | crop / floor | "
          "all-reduced per step, dense → crop (M values) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, v = r["img_s"], r["reduced_mvalues_per_step"]
        print(f"| {r['arch']} | {r['setting']} | {s['dense']} | {s['crop-aware']} | {s['floor']} | "
              f"{r['crop_vs_dense']}x | {100 * r['crop_vs_floor']:.1f}% | {v['dense']} → {v['crop-aware']} "
              f"({100 * r['reduced_crop_vs_dense']:.1f}%) |")


if __name__ == "__main__":
    main()
