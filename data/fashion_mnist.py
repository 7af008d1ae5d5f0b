"""Fashion-MNIST, the embedded CPU default: real 28x28 grayscale images read from IDX files.

Found in ``--data-root``, in Debian's ``dataset-fashion-mnist`` package, or downloaded by
torchvision where the internet is reachable. Images become 3 x 32 x 32 (padded) for the models.
"""
from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DataError
from .folder import sample_seed

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
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({arr.size} of {int(np.prod(shape))} values)")
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
        raise DataError(f"Fashion-MNIST not found ({where}; download failed: {str(e)[:80]}). Install Debian's "
                        f"package (apt-get install dataset-fashion-mnist → {DEBIAN_DIR}), pass --data-root DIR "
                        f"holding train-images-idx3-ubyte.gz etc., or run where the internet is reachable") from None


def load(folder: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels of ``part`` (train or test) from ``folder``."""
    images, labels = (read_idx(_find(folder, n)) for n in FILES[part])
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {part} files in {folder} disagree: {len(images)} images, {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST batches: normalized, padded (or resized) to ``input_size``, gray repeated to 3 channels.

    Transforms run on whole batches in ``__getitems__`` (a per-image pipeline costs more than a
    small network's step on a CPU). ``train=True`` adds a random crop of the 4-pixel-padded image
    and a horizontal flip, drawn per sample from an RNG seeded by (seed, epoch, sample index).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, input_size: int, train: bool, seed: int = 0) -> None:
        self.images, self.labels, self.size, self.train = images, labels, input_size, train
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([i])
        return x[0], int(y[0])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[indices].float().div_(255).sub_(MEAN).div_(STD)[:, None]
        y = self.labels[indices]
        background = -MEAN / STD
        if self.size == 32:
            x = F.pad(x, (2, 2, 2, 2), value=background)
        else:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.train:
            draws = [random.Random(sample_seed(self.seed, self.epoch, i)) for i in indices]
            draws = [(r.randrange(9), r.randrange(9), r.random() < 0.5) for r in draws]
            padded = F.pad(x, (4, 4, 4, 4), value=background)
            x = torch.stack([p[:, dy:dy + self.size, dx:dx + self.size] for p, (dy, dx, _) in zip(padded, draws)])
            flip = torch.tensor([f for _, _, f in draws])
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.expand(-1, 3, -1, -1).contiguous(), y

    @staticmethod
    def collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``__getitems__`` already returns a whole batch."""
        return batch
