"""ImageNet-style data: ``ImageFolder`` trees ``train/<class>/*`` and ``val/<class>/*`` under a root."""
from __future__ import annotations

import multiprocessing
import os
import queue
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DamagedImage(DataError):
    """An image file that cannot be decoded: one line naming it.

    A loader worker's exception comes back to the main process re-raised with the worker's whole
    traceback as its message; its last line, this error's own, is kept.
    """

    def __init__(self, message: str) -> None:
        lines = [line for line in str(message).strip().splitlines() if line.strip()]
        super().__init__(lines[-1].split("DamagedImage: ", 1)[-1] if lines else message)


class DamageLog:
    """Where a data set's images report the damaged files they skipped (``--skip-bad-images``), for
    the main process to log: a queue from the loader workers, a list in the process that made it."""

    def __init__(self) -> None:
        self.owner, self.here, self.reports = os.getpid(), [], multiprocessing.Queue()

    def report(self, message: str) -> None:
        if os.getpid() == self.owner:
            self.here.append(message)
        else:
            self.reports.put(message)  # a worker flushes it to the pipe before it exits

    def drain(self) -> list[str]:
        """Every report since the last drain."""
        out, self.here = self.here, []
        while True:
            try:
                out.append(self.reports.get_nowait())
            except queue.Empty:
                return out


class Images(Dataset):
    """A list of ``(path, class)`` samples read with PIL and passed through ``transform``.

    Random transforms of a sample draw from an RNG seeded by (seed, epoch, sample index), so its
    augmentation is the same in any worker, any batch or process shard, and after a resume. A file
    that cannot be decoded raises ``DamagedImage``, or with a ``damage_log`` is left out of its
    batch and reported there.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, seed: int = 0,
                 damage_log: DamageLog | None = None) -> None:
        self.samples, self.transform, self.seed, self.epoch = samples, transform, seed, 0
        self.damage_log = damage_log

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), target
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise DamagedImage(f"damaged image {path} ({reason}); replace or remove it, or pass --skip-bad-images "
                               f"to leave such images out (each is logged)") from None

    def damaged(self) -> list[str]:
        """The damaged images skipped since the last call (always none without a ``damage_log``)."""
        return self.damage_log.drain() if self.damage_log is not None else []

    def raw(self) -> tuple[Images, Callable[[torch.Tensor], torch.Tensor]]:
        """These images before their normalization (uint8), and the normalization, which takes
        single images and batches alike (``data.cache`` keeps decoded sets this way)."""
        steps = getattr(self.transform, "transforms", [])
        if not steps or not isinstance(steps[-1], Normalize):
            raise ValueError("raw() needs a transform ending in data.folder.Normalize (the eval transform)")
        from torchvision import transforms as T

        return Images(self.samples, T.Compose(steps[:-1]), self.seed, self.damage_log), steps[-1]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        out = []
        with torch.random.fork_rng(devices=[]):
            for i in indices:
                torch.manual_seed(sample_seed(self.seed, self.epoch, i))
                try:
                    out.append(self[i])
                except DamagedImage as e:
                    if self.damage_log is None:
                        raise
                    self.damage_log.report(str(e).split(";")[0] + " skipped")
        if not out:
            raise DamagedImage(f"every image of a batch is damaged, e.g. {self.samples[indices[0]][0]}; check the "
                               f"data folder")
        return out


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 63


class Normalize:
    """uint8 images ``(C, H, W)`` or batches ``(N, C, H, W)`` to normalized floats, on the tensor's
    own device, with the very operations of torchvision's ``ToTensor`` + ``Normalize`` (on the CPU the
    result is bit for bit theirs; a GPU does the same IEEE float operations)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        return {"mean": self.mean, "std": self.std, "_on": {}}  # loader workers get no GPU tensors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._on:  # made once per device: no host-to-device copy per batch
            self._on[x.device] = tuple(torch.tensor(v, device=x.device).view(-1, 1, 1) for v in (self.mean, self.std))
        mean, std = self._on[x.device]
        return x.float().div_(255).sub_(mean).div_(std)


class Lighting:
    """AlexNet's PCA lighting noise (Krizhevsky et al., 2012) on a float RGB image in [0, 1]: adds
    ImageNet's principal colour components, each scaled by its eigenvalue and a normal draw of
    standard deviation ``std`` (from torch's RNG, which ``Images`` seeds per sample)."""

    # ImageNet's RGB covariance, as published with AlexNet and used by fb.resnet.torch and MetaPruning
    EIGVAL = (0.2175, 0.0188, 0.0045)
    EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

    def __init__(self, std: float) -> None:
        self.std, self.eigvec, self.eigval = std, torch.tensor(self.EIGVEC), torch.tensor(self.EIGVAL)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        shift = self.eigvec @ (alpha * self.eigval)  # one offset per channel
        return img + shift.view(3, 1, 1)


def transforms(input_size: int, lighting: float = 0.0) -> tuple[Callable, Callable]:
    """Standard ImageNet train (random-resized crop, flip, optional PCA ``lighting``) and eval
    (resize, center crop) transforms."""
    from torchvision import transforms as T  # imported late: it costs seconds that --dry-run should not pay

    train = T.Compose([T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(),
                       *([Lighting(lighting)] if lighting else []), T.Normalize(MEAN, STD)])
    evaluate = T.Compose([T.Resize(int(round(input_size / 0.875))), T.CenterCrop(input_size), T.PILToTensor(),
                          Normalize(MEAN, STD)])
    return train, evaluate


def scan(root: Path, part: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and samples of ``root/part`` with clear errors for a missing or empty tree."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    folder = root / part
    if not folder.is_dir():
        raise DataError(f"--data-root {root}: no {part}/ folder (an ImageNet-style root holds "
                        f"train/<class>/<image> and val/<class>/<image>)")
    try:
        classes, index = find_classes(str(folder))
        samples = make_dataset(str(folder), index, IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise DataError(f"--data-root {root}: {part}/ holds no images ({e})") from None
    return classes, samples
