"""Generated ImageFolder data for tests and benchmarks: real JPEG files, learnable classes.

Class ``c`` draws its images around a class colour with a class-specific stripe orientation, plus
noise, so a small network can tell the classes apart within a few steps.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: str | Path, num_classes: int = 3, train_per_class: int = 12, val_per_class: int = 4,
                      size: int = 24, seed: int = 0) -> Path:
    """Write ``root/train/class_k/*.jpg`` and ``root/val/class_k/*.jpg``; return ``root``."""
    root, rng = Path(root), np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for part, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            out = root / part / f"class_{c:03d}"
            out.mkdir(parents=True, exist_ok=True)
            colour = np.array(colorsys.hsv_to_rgb(c / num_classes, 0.8, 0.9))
            angle = np.pi * c / num_classes
            stripes = 0.5 + 0.5 * np.sin(12 * (np.cos(angle) * xx + np.sin(angle) * yy))
            for i in range(n):
                img = colour * (0.4 + 0.6 * stripes[..., None]) + rng.normal(0, 0.08, (size, size, 3))
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(out / f"{i:04d}.jpg", quality=90)
    return root
