"""Shared building blocks: the static layer spec, the PrunedNet and the PruningNet built from it.

An architecture family (``resnet.py``, ``mobilenetv2.py``) only describes its stage table as a list
of ``BlockSpec``; everything here walks that list, so the PrunedNet, the PruningNet and the cost
model can never disagree about the structure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .gene import FULL_ID, NUM_SCALES, SCALES, Gene, GeneLayout, channels

IMAGE_SLOT = -1  # pseudo gene slot of the input image (3 channels, never pruned)
IMAGE_CHANNELS = 3

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}
_FUNCTIONAL = {"relu": F.relu, "relu6": F.relu6}


@dataclass(frozen=True)
class ConvSpec:
    """One conv → BN (→ activation). Channels come from gene slots; ``depthwise`` keeps in == out."""

    name: str
    in_slot: int
    out_slot: int
    kernel: int
    stride: int
    act: str | None
    gen_slots: tuple[int, ...]  # gene slots whose ratios feed this conv's weight generator
    gen_hidden: int
    depthwise: bool = False


@dataclass(frozen=True)
class BlockSpec:
    """A main path of convs, an optional residual (projection conv or identity), then ``act``."""

    name: str
    convs: tuple[ConvSpec, ...]
    shortcut: ConvSpec | None = None
    identity: bool = False
    act: str | None = None
    maxpool: bool = False  # 3x3/2 max-pool after the block (ResNet's ImageNet stem)


@dataclass(frozen=True)
class ArchSpec:
    """A whole network: its gene layout, base width per gene slot, blocks and classifier."""

    layout: GeneLayout
    bases: tuple[int, ...]
    blocks: tuple[BlockSpec, ...]
    classifier_slot: int
    dropout: float = 0.0

    def channels(self, gene: Gene) -> list[int]:
        """Channels of every gene slot for a (validated) gene."""
        return [channels(b, g) for b, g in zip(self.bases, gene)]

    def convs(self) -> list[ConvSpec]:
        return [c for b in self.blocks for c in block_convs(b)]


def block_convs(block: BlockSpec) -> tuple[ConvSpec, ...]:
    """A block's convs in spec order: its main path, then its projection shortcut."""
    return (*block.convs, *([block.shortcut] if block.shortcut else []))


def conv_out_size(size: int, kernel: int, stride: int) -> int:
    """Spatial size after a conv with 'same' padding (kernel // 2)."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


@dataclass(frozen=True)
class PlacedConv:
    """A conv of a spec with the spatial size of its input and of its output."""

    conv: ConvSpec
    in_size: int
    out_size: int


@dataclass(frozen=True)
class PlacedBlock:
    """A block with its placed convs (``block_convs`` order) and the size of its output before any max-pool."""

    block: BlockSpec
    convs: tuple[PlacedConv, ...]
    out_size: int


def walk(spec: ArchSpec, input_size: int) -> tuple[list[PlacedBlock], int]:
    """Every block of ``spec`` at ``input_size``, with the spatial sizes its convs see, in spec order;
    and the size of the final feature map. The cost model and the latency table read the network
    through this one walk."""
    blocks, size = [], input_size
    for block in spec.blocks:
        block_in, placed = size, []
        for conv in block.convs:
            out = conv_out_size(size, conv.kernel, conv.stride)
            placed.append(PlacedConv(conv, size, out))
            size = out
        if block.shortcut is not None:
            placed.append(PlacedConv(block.shortcut, block_in,
                                     conv_out_size(block_in, block.shortcut.kernel, block.shortcut.stride)))
        blocks.append(PlacedBlock(block, tuple(placed), size))
        if block.maxpool:
            size = conv_out_size(size, 3, 2)
    return blocks, size


def module_key(name: str) -> str:
    """The module key of the conv named ``name``: the name, with ``_`` for the dots a key may not hold."""
    return name.replace(".", "_")


def _in_channels(conv: ConvSpec, ch: list[int]) -> int:
    return IMAGE_CHANNELS if conv.in_slot == IMAGE_SLOT else ch[conv.in_slot]


class ConvBN(nn.Module):
    """A PrunedNet's conv → BN (→ activation) for one ``ConvSpec`` at the gene's channel counts."""

    def __init__(self, conv: ConvSpec, ch: list[int]) -> None:
        super().__init__()
        cin, cout = _in_channels(conv, ch), ch[conv.out_slot]
        self.conv = nn.Conv2d(cin, cout, conv.kernel, conv.stride, conv.kernel // 2,
                              groups=cout if conv.depthwise else 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = ACTIVATIONS[conv.act](inplace=True) if conv.act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _PrunedBlock(nn.Module):
    def __init__(self, block: BlockSpec, ch: list[int]) -> None:
        super().__init__()
        self.body = nn.Sequential(*[ConvBN(c, ch) for c in block.convs])
        self.shortcut = ConvBN(block.shortcut, ch) if block.shortcut else None
        self.identity = block.identity
        self.act = ACTIVATIONS[block.act](inplace=True) if block.act else nn.Identity()
        self.pool = nn.MaxPool2d(3, 2, 1) if block.maxpool else nn.Identity()

    def convs(self) -> list[ConvBN]:
        return [*self.body, *([self.shortcut] if self.shortcut is not None else [])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        elif self.identity:
            y = y + x
        return self.pool(self.act(y))


class PrunedNet(nn.Module):
    """A plain network for one gene: ``nn.Conv2d`` + affine BN, trainable from scratch."""

    def __init__(self, spec: ArchSpec, gene: Gene, num_classes: int) -> None:
        super().__init__()
        self.spec, self.gene, self.num_classes = spec, tuple(gene), num_classes
        ch = spec.channels(self.gene)
        self.blocks = nn.Sequential(*[_PrunedBlock(b, ch) for b in spec.blocks])
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.classifier = nn.Linear(ch[spec.classifier_slot], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def zero_init_residual(self) -> None:
        """Zero the scale of the last BN of every residual block's body, so that each block starts as its
        shortcut (Goyal et al., 2017): a deep narrow net then trains alike from any initialisation."""
        for blk in self.blocks:
            if blk.shortcut is not None or blk.identity:
                nn.init.zeros_(blk.body[-1].bn.weight)

    def conv_bns(self) -> dict[str, ConvBN]:
        """Every conv+BN by its spec name, in spec order (``ArchSpec.convs``)."""
        modules = (m for blk in self.blocks for m in blk.convs())  # spec order, as ``block_convs`` walks a block
        return dict(zip((c.name for c in self.spec.convs()), modules, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


@dataclass(frozen=True)
class CropGrad:
    """The gradient of a generator's matrices for one generated weight, in factored form: the
    ``[:cout, :cin]`` crop of ``weight2`` gets ``dw[..., None] * hidden``, that of ``bias2`` gets ``dw``,
    and nothing outside the crop gets anything. ``dw`` is the gradient of the generated weight,
    ``(cout, cin, kh*kw)``: ``h`` times smaller than the crop of ``weight2``."""

    cout: int
    cin: int
    dw: torch.Tensor
    hidden: torch.Tensor


def _crop_product(weight2: torch.Tensor, bias2: torch.Tensor, hidden: torch.Tensor, cout: int,
                  cin: int) -> torch.Tensor:
    """``bias2[:cout, :cin] + weight2[:cout, :cin] @ hidden`` as ``(cout, 1, cin*k2)``.

    The crop is a strided view; a batched matmul over output channels reads it in place, where a
    plain matmul would first copy it (3-4x slower, the memory traffic dominates). Written as
    ``hidden^T crop^T`` (a row times a matrix per output channel): 2-3x faster on the CPU than the
    matrix-vector form, whose dot products are only ``h`` long."""
    k2, h = weight2.shape[2:]
    return torch.baddbmm(bias2[:cout, :cin].reshape(cout, 1, cin * k2), hidden.view(1, 1, h).expand(cout, 1, h),
                         weight2[:cout, :cin].view(cout, cin * k2, h).transpose(1, 2))


class _CropGeneration(torch.autograd.Function):
    """The generated weight, whose backward hands the generator matrices' gradient to the module's
    ``crop_grads`` as a ``CropGrad`` instead of giving them a full-size, mostly-zero ``.grad``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, module: "GeneratedConv", cout: int, cin: int) -> torch.Tensor:
        ctx.module, ctx.crop = module, (cout, cin)
        ctx.save_for_backward(hidden)
        return _crop_product(module.weight2.detach(), module.bias2.detach(), hidden, cout, cin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (hidden,), m, (cout, cin) = ctx.saved_tensors, ctx.module, ctx.crop
        k2, h = m.weight2.shape[2:]
        dw = grad.contiguous().view(cout, cin, k2)
        m.crop_grads.append(CropGrad(cout, cin, dw, hidden.detach()))
        # d hidden = sum over the crop of weight2 * dw: the crop read in place by one batched product
        # (a row times a matrix per output channel, 4x faster on the CPU than autograd's transposed form)
        crop = m.weight2.detach()[:cout, :cin].view(cout, cin * k2, h)
        dhidden = torch.bmm(dw.view(cout, 1, cin * k2), crop).sum(0).view(h)
        return dhidden, None, None, None


class CropOwner(Protocol):
    """What updates a ``GeneratedConv``'s matrices by crop (``app.crop_sgd.CropSGD``)."""

    def catch_up(self, conv: "GeneratedConv", cout: int, cin: int) -> None:
        """Bring the ``[:cout, :cin]`` corner of ``conv``'s matrices up to date."""

    def flush(self) -> None:
        """Bring every matrix it updates up to date."""


class GeneratedConv(nn.Module):
    """A conv whose weight is generated from layer ratios, with one BatchNorm per scale id.

    Generator: ``Linear(k → h) → ReLU → Linear(h → numel(W_max))``. The second linear is stored
    as ``(out, in, kh*kw, h)`` so that cropping to the active channels is a slice, not a gather.

    ``crop_owner`` is None while the matrices of the second linear take their gradient from autograd
    as usual (a full-size ``.grad``, zero outside the gene's crop). An optimizer that updates them by
    crop sets itself as the owner and ``crop_grads`` to a list, which every backward then appends a
    ``CropGrad`` to. Whatever reads the matrices sees them up to date: a generated corner is caught
    up first, ``state_dict`` flushes the owner.
    """

    def __init__(self, conv: ConvSpec, bases: tuple[int, ...], scale_ids: dict[int, tuple[int, ...]]) -> None:
        super().__init__()
        self.spec = conv
        cout = bases[conv.out_slot]
        cin = 1 if conv.depthwise else (IMAGE_CHANNELS if conv.in_slot == IMAGE_SLOT else bases[conv.in_slot])
        k2, h = conv.kernel * conv.kernel, conv.gen_hidden
        self.fc1 = nn.Linear(len(conv.gen_slots), h)
        # Uniform init scaled so that the widest gene's weight starts with the PrunedNet's Kaiming
        # (fan-out) std: Var(W2 h + b2) = bound^2 / 3 * (|h|^2 + 1). nn.Linear's default for this layer
        # makes weights several times larger, which on Fashion-MNIST left the loss above chance for
        # the whole first epoch and cost 10-20 points of probe top-1.
        with torch.no_grad():
            widest = F.relu(self.fc1(torch.ones(len(conv.gen_slots))))
        std = (2.0 / (cout * k2)) ** 0.5
        # a net built on the meta device has shapes and no values: nothing to scale by
        bound = 0.0 if widest.is_meta else std * (3.0 / (float(widest.square().sum()) + 1.0)) ** 0.5
        self.weight2 = nn.Parameter(torch.empty(cout, cin, k2, h).uniform_(-bound, bound))
        self.bias2 = nn.Parameter(torch.empty(cout, cin, k2).uniform_(-bound, bound))
        self.register_buffer("gen_index", torch.tensor(conv.gen_slots), persistent=False)
        self.bns = nn.ModuleDict({str(i): nn.BatchNorm2d(channels(cout, i), affine=False)
                                  for i in scale_ids[conv.out_slot]})
        self.crop_owner: CropOwner | None = None
        self.crop_grads: list[CropGrad] | None = None
        self.register_state_dict_pre_hook(GeneratedConv._up_to_date)

    def _up_to_date(self, prefix: str, keep_vars: bool) -> None:
        if self.crop_owner is not None:
            self.crop_owner.flush()

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickle) is not attached to the optimizer that updates this one by crop."""
        return {**self.__dict__, "crop_grads": None, "crop_owner": None}

    def generate(self, ratios: torch.Tensor, cin: int, cout: int) -> torch.Tensor:
        """The cropped conv weight ``(cout, cin, k, k)`` for the gene's ratio vector."""
        hidden = F.relu(self.fc1(ratios.index_select(0, self.gen_index)))
        cin = 1 if self.spec.depthwise else cin
        if self.crop_owner is not None:
            self.crop_owner.catch_up(self, cout, cin)
        if self.crop_grads is None or not torch.is_grad_enabled():
            w = _crop_product(self.weight2, self.bias2, hidden, cout, cin)
        else:
            w = _CropGeneration.apply(hidden, self, cout, cin)
        return w.view(cout, cin, self.spec.kernel, self.spec.kernel)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, scale_id: int) -> torch.Tensor:
        c = self.spec
        x = F.conv2d(x, weight, None, c.stride, c.kernel // 2, 1, weight.shape[0] if c.depthwise else 1)
        x = self.bns[str(scale_id)](x)
        return _FUNCTIONAL[c.act](x) if c.act else x


class PruningNet(nn.Module):
    """The meta-network: generates the weights of any PrunedNet of its spec from the gene."""

    def __init__(self, spec: ArchSpec, num_classes: int) -> None:
        super().__init__()
        self.spec, self.num_classes = spec, num_classes
        all_ids = tuple(range(NUM_SCALES))
        scale_ids = {s: (FULL_ID,) if s in spec.layout.fixed else all_ids for s in range(len(spec.bases))}
        # keyed by the conv's name: state-dict keys say which layer they are, and a PrunedNet's convs
        # pair with their generators by name
        self.convs = nn.ModuleDict({module_key(c.name): GeneratedConv(c, spec.bases, scale_ids) for c in spec.convs()})
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.classifier = nn.Linear(spec.bases[spec.classifier_slot], num_classes)
        self.register_buffer("scales", torch.tensor(SCALES), persistent=False)
        self.register_load_state_dict_pre_hook(PruningNet._numbered_keys)

    def _numbered_keys(self, state_dict: dict, prefix: str, *_: object) -> None:
        """Read the weights of a checkpoint written before the generators were keyed by name
        (``convs.{i}.``, spec order) under their names."""
        keys = list(self.convs)
        for old in [k for k in state_dict if k.startswith(f"{prefix}convs.")]:
            index, _, rest = old[len(prefix) + 6:].partition(".")
            if index.isdigit() and int(index) < len(keys):
                state_dict[f"{prefix}convs.{keys[int(index)]}.{rest}"] = state_dict.pop(old)

    def generate(self, gene: Gene) -> dict[str, torch.Tensor]:
        """All conv weights of ``gene``, by conv name in spec order. Called once per gene, never per sample.

        Always in fp32, also under autocast: a low-precision generator would first cast the whole
        fp32 crop of every generator matrix (``h`` times the weight's size) to a new copy; the conv
        that uses a generated weight casts that small weight instead.
        """
        device = self.scales.device
        # pinned, so the copy to the GPU is queued without the host waiting for the device
        ids = torch.tensor(gene, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        ch = self.spec.channels(gene)
        with torch.autocast(device.type, enabled=False):
            ratios = self.scales[ids]
            return {m.spec.name: m.generate(ratios, _in_channels(m.spec, ch), ch[m.spec.out_slot])
                    for m in self.convs.values()}

    def forward(self, x: torch.Tensor, gene: Gene) -> torch.Tensor:
        weights = self.generate(gene)

        def conv(c: ConvSpec, inp: torch.Tensor) -> torch.Tensor:
            return self.convs[module_key(c.name)](inp, weights[c.name], gene[c.out_slot])

        for block in self.spec.blocks:
            inp = x
            for c in block.convs:
                x = conv(c, x)
            if block.shortcut is not None:
                x = x + conv(block.shortcut, inp)
            elif block.identity:
                x = x + inp
            if block.act:
                x = _FUNCTIONAL[block.act](x)
            if block.maxpool:
                x = F.max_pool2d(x, 3, 2, 1)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))

    @torch.no_grad()
    def materialize(self, gene: Gene) -> PrunedNet:
        """A PrunedNet for ``gene`` with the generated weights and that gene's per-scale BN statistics.

        In eval mode its output equals ``self(x, gene)``; it needs nothing of the PruningNet to run.
        Built straight on the PruningNet's device without initializing weights (every tensor is
        overwritten below), so it costs no host-to-device copy and draws nothing from the RNG.
        """
        with torch.device("meta"):
            net = PrunedNet(self.spec, gene, self.num_classes)
        net = net.to_empty(device=self.scales.device)
        weights = self.generate(gene)
        for name, target in net.conv_bns().items():
            gconv = self.convs[module_key(name)]
            target.conv.weight.copy_(weights[name])
            src = gconv.bns[str(gene[gconv.spec.out_slot])]
            target.bn.running_mean.copy_(src.running_mean)
            target.bn.running_var.copy_(src.running_var)
            target.bn.num_batches_tracked.copy_(src.num_batches_tracked)
            target.bn.eps = src.eps
            nn.init.ones_(target.bn.weight)
            nn.init.zeros_(target.bn.bias)
        net.classifier.load_state_dict(self.classifier.state_dict())
        return net


@torch.no_grad()
def recalibrate_bn(net: nn.Module, batches: Iterable[torch.Tensor], *args: object) -> nn.Module:
    """Replace every BN's running statistics by exact averages over ``batches``, then set eval mode.

    The average is cumulative: before batch ``i`` every BN's momentum is ``1 / (i + 1)``, which is
    what momentum ``None`` computes, without that mode's read of ``num_batches_tracked`` on the
    host in every BN forward (one device sync per BN per batch). Extra ``args`` are passed to the
    forward (the gene, for a PruningNet).
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    net.train()
    for i, x in enumerate(batches):
        for m in bns:
            m.momentum = 1.0 / (i + 1)
        net(x, *args)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return net.eval()
