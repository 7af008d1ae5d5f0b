"""Datasets and loaders: one call returns the train, sub-validation and validation parts of a dataset."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import fashion_mnist, folder, split
from .cache import DecodedBatches, decode
from .errors import DataError


@dataclass
class DataBundle:
    """``train`` (augmented) and ``train_eval`` (eval transforms, for BN recalibration) hold the same
    images: all of train, or train minus the sub-validation split when it is held out (``subval``
    is ``None`` otherwise: retraining needs no split)."""

    train: Dataset
    train_eval: Dataset
    subval: Dataset | None
    val: Dataset
    num_classes: int
    split_file: Path | None
    pending_split: str | None = None

    def save_split(self) -> None:
        """Write a freshly drawn split; ``get_data(defer_split=True)`` leaves that to the caller, so a
        run that stops on bad input before it starts writes nothing."""
        if self.pending_split is not None:
            split.save(self.split_file, self.pending_split)
            self.pending_split = None


def get_data(dataset: str, data_root: str | None, input_size: int, val_per_class: int = 50,
             hold_out: bool = True, seed: int = 0, defer_split: bool = False,
             skip_damaged: bool = False, lighting: float = 0.0, split_dir: Path | None = None) -> DataBundle:
    """Load ``dataset`` (``imagenet``: any ImageFolder root; ``fashionmnist``) and its sub-val split.

    ``hold_out=True`` holds the sub-validation split out of training (PruningNet training, search),
    kept in ``split_dir``; ``hold_out=False`` trains on all of train (retraining a PrunedNet) and
    draws no split.
    ``skip_damaged`` leaves image files that cannot be decoded out of their batches (each reported
    through ``Images.damaged``) instead of stopping with one line naming the first. ``lighting`` adds
    PCA lighting noise of that standard deviation to the training images (ImageNet only).
    """
    if dataset == "imagenet":
        root = Path(data_root)
        Images = partial(folder.Images, damage_log=folder.DamageLog() if skip_damaged else None)  # one log for all
        classes, samples = folder.scan(root, "train")
        val_classes, val_samples = folder.scan(root, "val")
        if val_classes != classes:
            raise DataError(f"--data-root {root}: val/ has classes {val_classes[:3]}... but train/ has "
                            f"{classes[:3]}...; both must hold the same class folders")
        train_tf, eval_tf = folder.transforms(input_size, lighting)
        val = Images(val_samples, eval_tf)
        if not hold_out:
            return DataBundle(Images(samples, train_tf, seed), Images(samples, eval_tf), None, val, len(classes), None)
        rel = [str(Path(p).relative_to(root)) for p, _ in samples]
        path = split.split_path(_split_dir(split_dir), dataset, str(root.resolve()), val_per_class)
        held, pending = split.load_or_draw(path, rel, [t for _, t in samples], classes, val_per_class)
        keep = [s for s, r in zip(samples, rel) if r not in held]
        sub = [s for s, r in zip(samples, rel) if r in held]
        bundle = DataBundle(Images(keep, train_tf, seed), Images(keep, eval_tf), Images(sub, eval_tf), val,
                            len(classes), path, pending)
    elif dataset == "fashionmnist":
        where = fashion_mnist.locate(data_root)
        images, labels = fashion_mnist.load(where, "train")
        test_images, test_labels = fashion_mnist.load(where, "test")
        make = lambda m, train: fashion_mnist.FashionMNIST(images[m], labels[m], input_size, train, seed)
        val = fashion_mnist.FashionMNIST(test_images, test_labels, input_size, False)
        everything = torch.ones(len(labels), dtype=torch.bool)
        if not hold_out:
            return DataBundle(make(everything, True), make(everything, False), None, val,
                              len(fashion_mnist.CLASSES), None)
        # named after the labels' content, so another set of IDX files never reuses this split
        source = "fashion-mnist-train:" + hashlib.sha1(labels.numpy().tobytes()).hexdigest()
        path = split.split_path(_split_dir(split_dir), dataset, source, val_per_class)
        held, pending = split.load_or_draw(path, range(len(labels)), labels.tolist(), fashion_mnist.CLASSES,
                                           val_per_class)
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[sorted(held)] = True
        bundle = DataBundle(make(~mask, True), make(~mask, False), make(mask, False), val,
                            len(fashion_mnist.CLASSES), path, pending)
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose imagenet or fashionmnist")
    if not defer_split:
        bundle.save_split()
    return bundle


def _split_dir(folder: Path | None) -> Path:
    if folder is None:
        raise ValueError("get_data(hold_out=True) needs split_dir, the folder its split file is kept in")
    return folder


class EpochSampler(Sampler[int]):
    """Indices of one process's shard of an epoch: shuffled as a function of (seed, epoch) alone,
    and optionally starting part-way through (``set_start``), so that a resumed run sees exactly
    the batches an uninterrupted one would. Training shards are trimmed to equal sizes (DDP needs
    the same number of steps everywhere); evaluation shards are disjoint and cover every sample."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def _shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            order = order[: self.n - self.n % self.world]
        else:
            order = list(range(self.n))
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self._shard()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._shard()) - self.start)


def make_loader(ds: Dataset, batch_size: int, train: bool, workers: int, seed: int = 0,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A loader over this process's shard; training order and augmentation depend only on
    (seed, epoch, step): call ``loader.sampler.set_epoch`` and ``loader.dataset.set_epoch``."""
    sampler = EpochSampler(len(ds), train, seed, rank, world_size)
    # its own generator: creating an iterator draws a worker seed, which must not move the global RNG
    # (dropout draws from it, and a resumed run creates its iterator at another point of the stream)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                      pin_memory=pin_memory, collate_fn=getattr(ds, "collate", None),
                      generator=torch.Generator().manual_seed(seed))


def fixed_batches(ds: Dataset, n_batches: int, batch_size: int, seed: int = 0,
                  device: torch.device = torch.device("cpu"), workers: int = 0,
                  keep_on_device: bool = True) -> DecodedBatches:
    """``n_batches`` input batches drawn once (seeded) from ``ds``, decoded once for ``device``:
    the BN recalibration set (in host memory with ``keep_on_device=False``, see ``decode``)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)[: n_batches * batch_size].tolist()
    return decode(ds, batch_size, device, workers, indices=order, labels=False, keep_on_device=keep_on_device)
