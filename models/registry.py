"""Model registry: ``--arch`` names to factories, and architecture families to their specs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .gene import GeneLayout
from .pruningnet import ArchSpec

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, "Family"] = {}
SMALL_INPUT_MAX = 32  # inputs up to this size (Fashion-MNIST, CIFAR) get the small-input stem
# Smallest image side each stem takes (small-input stem or not): its 8x or 32x downsampling leaves 1 pixel.
MIN_INPUT_SIZE = {True: 8, False: 32}
MAX_INPUT_SIZE = 4096  # a larger side is a typo (22400 for 224), not an image this code can hold in memory
MAX_WIDTH_MULT = 16.0  # beyond this a full-width network has billions of parameters


@dataclass(frozen=True)
class Family:
    """An architecture family: its gene layout and the function that builds its spec."""

    layout: GeneLayout
    build_spec: Callable[[float, bool], ArchSpec]


def register_family(layout: GeneLayout, build_spec: Callable[[float, bool], ArchSpec]) -> None:
    if layout.family in _FAMILIES:
        raise ValueError(f"architecture family {layout.family!r} is already registered")
    _FAMILIES[layout.family] = Family(layout, build_spec)


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that adds a factory under ``name``; a second factory of the same name is refused."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def list_families() -> list[str]:
    """The architecture families, in the order they were registered (ResNet50 first)."""
    return list(_FAMILIES)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def get_family(arch: str) -> Family:
    """The family of an ``--arch`` name (``resnet50_prunednet`` → ``resnet50``) or of a family name."""
    family = arch.split("_")[0]
    if family not in _FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(list_models())}")
    return _FAMILIES[family]


def is_pruningnet(arch: str) -> bool:
    return arch.endswith("_pruningnet")


def small_input_for(input_size: int) -> bool:
    return input_size <= SMALL_INPUT_MAX
