"""Datasets and loaders: one call returns the train, sub-validation and validation parts of a dataset."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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
             hold_out: bool = True, dry: bool = False) -> DataBundle:
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
        return DataBundle(folder.Images(keep, train_tf), folder.Images(keep, eval_tf), folder.Images(sub, eval_tf),
                          folder.Images(val_samples, eval_tf), len(classes), path)
    if dataset == "fashionmnist":
        where = fashion_mnist.locate(data_root)
        images, labels = fashion_mnist.load(where, "train")
        test_images, test_labels = fashion_mnist.load(where, "test")
        path = split.split_path(dataset, "fashion-mnist-train", val_per_class)
        held = split.load_or_draw(path, range(len(labels)), labels.tolist(), fashion_mnist.CLASSES, val_per_class, dry)
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[sorted(held)] = True
        keep = ~mask if hold_out else torch.ones_like(mask)
        make = lambda m, train: fashion_mnist.FashionMNIST(images[m], labels[m], input_size, train)
        return DataBundle(make(keep, True), make(keep, False), make(mask, False),
                          fashion_mnist.FashionMNIST(test_images, test_labels, input_size, False),
                          len(fashion_mnist.CLASSES), path)
    raise UserError(f"unknown dataset {dataset!r}; choose imagenet or fashionmnist")


def make_loader(ds: Dataset, batch_size: int, train: bool, workers: int, seed: int = 0,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A loader whose order depends only on ``seed`` and the epoch (``loader.sampler.set_epoch``).

    A ``DistributedSampler`` is used even in one process so that the shuffle of an epoch is the
    same function of (seed, epoch) everywhere, which makes resuming at an epoch boundary exact.
    """
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                      pin_memory=pin_memory, persistent_workers=False)


def fixed_batches(ds: Dataset, n_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_batches`` input batches drawn once (seeded) from ``ds``: the BN recalibration set."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)[: n_batches * batch_size].tolist()
    xs = torch.stack([ds[i][0] for i in order])
    return list(xs.split(batch_size))
