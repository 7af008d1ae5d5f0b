"""Image sets decoded once and kept in memory as uint8, normalized batch by batch on the device.

The search scores thousands of candidates on the same sub-validation split and recalibration
batches. Streaming them from the JPEG files would decode every image again for every candidate
and make scoring data-bound; holding them as floats would take 4x the memory (30 GB for ImageNet's
50,000-image split at 224 px). Kept as uint8 (7.5 GB) on the GPU when that fits, in pinned host
memory otherwise, a batch costs a slice, a copy when on the host, and one normalization.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

DEVICE_SHARE = 0.5  # at most this share of the GPU's free memory holds one decoded set


class DecodedBatches:
    """A fixed sequence of batches: ``(x, y)`` with labels, else ``x``, on ``device``.

    ``images`` holds the whole set (uint8 with a ``normalize`` that turns a batch into the model's
    input, or already-normalized floats with ``normalize=None``), on ``device`` or in host memory.
    The batches are those a non-shuffling loader with this batch size would give, in that order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, device: torch.device,
                 normalize: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.device, self.normalize = device, normalize

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            x = self.images[start:start + self.batch_size].to(self.device, non_blocking=True)
            x = self.normalize(x) if self.normalize is not None else x
            if self.labels is None:
                yield x
            else:
                yield x, self.labels[start:start + self.batch_size].to(self.device, non_blocking=True)

    def describe(self) -> str:
        where = "pinned host memory" if self.images.is_pinned() else str(self.images.device)
        return (f"{len(self.images):,} images ({self.images.nbytes / 2 ** 30:.2f} GiB "
                f"{str(self.images.dtype).replace('torch.', '')}) in {where}")


def _storage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, keep_on_device: bool) -> torch.Tensor:
    """Room for a decoded set: on ``device`` when it may stay there and fits, else host memory
    (pinned when a GPU will read it, so its batches copy without the host waiting)."""
    if device.type != "cuda":
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if keep_on_device and nbytes <= DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def decode(ds: Dataset, batch_size: int, device: torch.device, workers: int = 0, indices: list[int] | None = None,
           labels: bool = True, keep_on_device: bool = True) -> DecodedBatches:
    """Decode ``ds`` (or its ``indices``) once into a ``DecodedBatches`` for ``device``.

    A dataset with a ``raw()`` method (``data.folder.Images``) is kept as uint8 and normalized per
    batch; any other is kept as the tensors it yields. ``keep_on_device=False`` keeps it in host
    memory even where the GPU has room (e.g. beside a training run that needs the memory).
    """
    collate = getattr(ds, "collate", None)
    source, normalize = ds.raw() if hasattr(ds, "raw") else (ds, None)
    if indices is not None:
        source = Subset(source, indices)
    loader = DataLoader(source, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    images = targets = None
    start = 0
    for x, y in loader:
        if images is None:
            images = _storage((len(source), *x.shape[1:]), x.dtype, device, keep_on_device)
            if labels:
                targets = torch.empty(len(source), dtype=torch.int64, device=images.device,
                                      pin_memory=images.is_pinned())
        images[start:start + len(x)].copy_(x, non_blocking=True)
        if labels:
            targets[start:start + len(y)].copy_(y, non_blocking=True)
        start += len(x)
    if images is None:
        raise ValueError("cannot decode an empty image set")
    # fewer when damaged images were skipped
    return DecodedBatches(images[:start], targets[:start] if labels else None, batch_size, device, normalize)
