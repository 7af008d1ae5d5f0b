"""Fashion-MNIST, the embedded CPU default: real 28x28 grayscale images read from IDX files.

Found in ``--data-root``, in Debian's ``dataset-fashion-mnist`` package, or downloaded by
torchvision where the internet is reachable. Images become 3 x 32 x 32 (padded) for the models.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from utils.config import UserError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_DIR = Path.home() / ".cache" / "metaprune"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise UserError(f"{path}: truncated IDX file ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


def _find(folder: Path, name: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for candidate in (sub / name, sub / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def locate(data_root: str | None) -> Path:
    """The folder holding the four IDX files; tries the download last."""
    places = ([Path(data_root)] if data_root else []) + [DEBIAN_DIR]
    for place in places:
        if all(_find(place, n) for pair in FILES.values() for n in pair):
            return place
    target = Path(data_root) if data_root else DOWNLOAD_DIR
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
        return target
    except Exception as e:  # any download failure means: tell the user the three ways
        where = f"--data-root {data_root}" if data_root else "no --data-root given"
        raise UserError(f"Fashion-MNIST not found ({where}; download failed: {str(e)[:80]}). Install Debian's "
                        f"package (apt-get install dataset-fashion-mnist → {DEBIAN_DIR}), pass --data-root DIR "
                        f"holding train-images-idx3-ubyte.gz etc., or run where the internet is reachable") from None


def load(folder: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = (read_idx(_find(folder, n)) for n in FILES[part])
    if len(images) != len(labels):
        raise UserError(f"Fashion-MNIST {part} files in {folder} disagree: {len(images)} images, {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Images normalized, padded (or resized) to ``input_size`` and repeated to 3 channels.

    ``train=True`` adds a random 4-pixel-padded crop and a horizontal flip.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, input_size: int, train: bool) -> None:
        self.images, self.labels, self.size, self.train = images, labels, input_size, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = (self.images[i].float().div(255) - MEAN) / STD
        x = x[None]
        if self.size == 32:
            x = F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)
        else:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        if self.train:
            dx, dy = torch.randint(0, 9, (2,)).tolist()
            x = F.pad(x, (4, 4, 4, 4), value=-MEAN / STD)[:, dy:dy + self.size, dx:dx + self.size]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x.expand(3, -1, -1), int(self.labels[i])
