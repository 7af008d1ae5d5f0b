"""Datasets and loaders: one call returns the train, sub-validation and validation parts of a dataset."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from utils.config import UserError

from . import fashion_mnist, folder, split


@dataclass
class DataBundle:
    """``train`` (augmented) and ``train_eval`` (eval transforms, for BN recalibration) hold the same
    images: all of train, or train minus the sub-validation split when it is held out."""

    train: Dataset
    train_eval: Dataset
    subval: Dataset
    val: Dataset
    num_classes: int
    split_file: Path


def get_data(dataset: str, data_root: str | None, input_size: int, val_per_class: int = 50,
             hold_out: bool = True, dry: bool = False, seed: int = 0) -> DataBundle:
    """Load ``dataset`` (``imagenet``: any ImageFolder root; ``fashionmnist``) and its sub-val split.

    ``hold_out=False`` trains on all of train (retraining a PrunedNet); the split still exists, so
    every stage agrees on it. ``dry`` computes the split without writing it.
    """
    if dataset == "imagenet":
        root = Path(data_root)
        classes, samples = folder.scan(root, "train")
        val_classes, val_samples = folder.scan(root, "val")
        if val_classes != classes:
            raise UserError(f"--data-root {root}: val/ has classes {val_classes[:3]}... but train/ has "
                                  f"{classes[:3]}...; both must hold the same class folders")
        rel = [str(Path(p).relative_to(root)) for p, _ in samples]
        path = split.split_path(dataset, str(root.resolve()), val_per_class)
        held = split.load_or_draw(path, rel, [t for _, t in samples], classes, val_per_class, dry)
        keep = [s for s, r in zip(samples, rel) if (r not in held) or not hold_out]
        sub = [s for s, r in zip(samples, rel) if r in held]
        train_tf, eval_tf = folder.transforms(input_size)
        return DataBundle(folder.Images(keep, train_tf, seed), folder.Images(keep, eval_tf),
                          folder.Images(sub, eval_tf), folder.Images(val_samples, eval_tf), len(classes), path)
    if dataset == "fashionmnist":
        where = fashion_mnist.locate(data_root)
        images, labels = fashion_mnist.load(where, "train")
        test_images, test_labels = fashion_mnist.load(where, "test")
        path = split.split_path(dataset, "fashion-mnist-train", val_per_class)
        held = split.load_or_draw(path, range(len(labels)), labels.tolist(), fashion_mnist.CLASSES, val_per_class, dry)
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[sorted(held)] = True
        keep = ~mask if hold_out else torch.ones_like(mask)
        make = lambda m, train: fashion_mnist.FashionMNIST(images[m], labels[m], input_size, train, seed)
        return DataBundle(make(keep, True), make(keep, False), make(mask, False),
                          fashion_mnist.FashionMNIST(test_images, test_labels, input_size, False),
                          len(fashion_mnist.CLASSES), path)
    raise UserError(f"unknown dataset {dataset!r}; choose imagenet or fashionmnist")


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


def fixed_batches(ds: Dataset, n_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_batches`` input batches drawn once (seeded) from ``ds``: the BN recalibration set."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)[: n_batches * batch_size].tolist()
    loader = DataLoader(Subset(ds, order), batch_size=batch_size, collate_fn=getattr(ds, "collate", None))
    return [x for x, _ in loader]
