"""Generated data for tests and benchmarks, in the real file formats: learnable classes.

Class ``c`` draws its images with a class-specific stripe orientation (and, in colour, a class
colour), plus noise, so a small network can tell the classes apart within a few steps.
"""
from __future__ import annotations

import colorsys
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: str | Path, num_classes: int = 3, train_per_class: int = 12, val_per_class: int = 4,
                      size: int | tuple[int, int] = 24, seed: int = 0) -> Path:
    """Write ``root/train/class_k/*.jpg`` and ``root/val/class_k/*.jpg`` of ``size`` pixels (a side,
    or width and height: ImageNet's typical photo is 500 x 375); return ``root``."""
    root, rng = Path(root), np.random.default_rng(seed)
    width, height = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    for part, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            out = root / part / f"class_{c:03d}"
            out.mkdir(parents=True, exist_ok=True)
            colour = np.array(colorsys.hsv_to_rgb(c / num_classes, 0.8, 0.9))
            angle = np.pi * c / num_classes
            stripes = 0.5 + 0.5 * np.sin(12 * (np.cos(angle) * xx + np.sin(angle) * yy))
            for i in range(n):
                img = colour * (0.4 + 0.6 * stripes[..., None]) + rng.normal(0, 0.08, (height, width, 3))
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(out / f"{i:04d}.jpg", quality=90)
    return root


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as a gzipped unsigned-byte IDX file (the format of MNIST and Fashion-MNIST)."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: str | Path, train_per_class: int = 12, test_per_class: int = 3, seed: int = 0) -> Path:
    """Write the four Fashion-MNIST IDX files (10 classes of 28x28 gray images) under ``root``; return it."""
    root, rng = Path(root), np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:28, 0:28] / 28
    for part, n in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.arange(10 * n) % 10
        angles = np.pi * labels / 10
        stripes = 0.5 + 0.5 * np.sin(10 * (np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy))
        images = np.clip(stripes + rng.normal(0, 0.15, stripes.shape), 0, 1) * 255
        write_idx(root / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{part}-labels-idx1-ubyte.gz", labels)
    return root
