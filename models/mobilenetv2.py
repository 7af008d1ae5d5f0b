"""MobileNetV2 (MetaPruning's 1.4x base, not torchvision's): stage table, gene layout, factories.

Gene (26 ids): ``[stem, 7 bottleneck stages, last_conv, mid_1 … mid_17]``. ``mid_k`` is the expand
width of bottleneck k, whose full width is the block's *input* base channels times ``t``;
``last_conv`` stays full width because the classifier input is fixed.
"""
from __future__ import annotations

from .gene import GeneLayout, OfficialForm
from .pruningnet import IMAGE_SLOT, ArchSpec, BlockSpec, ConvSpec, PrunedNet, PruningNet
from .registry import register_family, register_model

# t (expansion), c (output channels), n (repeats), s (first stride); first row is the stem conv,
# last row the final 1x1 conv.
STAGES = (
    (0, 44, 1, 2),
    (1, 22, 1, 1),
    (6, 33, 2, 2),
    (6, 44, 3, 2),
    (6, 88, 4, 2),
    (6, 132, 3, 1),
    (6, 224, 3, 2),
    (6, 448, 1, 1),
    (0, 1280, 1, 1),
)
BOTTLENECKS = STAGES[1:-1]
NUM_BLOCKS = sum(n for _, _, n, _ in BOTTLENECKS)
STEM_HIDDEN, BLOCK_HIDDEN = 32, 64
DROPOUT = 0.2

def _official_form() -> OfficialForm:
    """The official code's 35 ids: 18 per-layer output ids (the stem, then every bottleneck, the
    blocks of a stage kept equal), then the 17 expand ids; the last conv is always full width."""
    outputs, first = [(0,)], 1
    for _, _, n, _ in BOTTLENECKS:
        outputs.append(tuple(range(first, first + n)))
        first += n
    return OfficialForm(first + NUM_BLOCKS, (*outputs, None, *((first + k,) for k in range(NUM_BLOCKS))))


LAYOUT = GeneLayout(
    family="mobilenetv2",
    names=("stem", *(f"stage{i + 1}" for i in range(len(BOTTLENECKS))), "last_conv",
           *(f"mid_{k + 1}" for k in range(NUM_BLOCKS))),
    fixed=(len(BOTTLENECKS) + 1,),
    official=_official_form(),
)


def build_spec(width_mult: float = 1.0, small_input: bool = False) -> ArchSpec:
    """The MobileNetV2 structure; ``small_input`` makes the stem and the first stride-2 stage stride 1."""
    scale = lambda c: max(1, int(round(c * width_mult)))
    last_slot, mid_slot = len(BOTTLENECKS) + 1, len(BOTTLENECKS) + 2
    stem_c, last_c = STAGES[0][1], STAGES[-1][1]

    mid_bases, in_c = [], stem_c
    for t, c, n, _ in BOTTLENECKS:
        for _ in range(n):
            mid_bases.append(scale(in_c * t))
            in_c = c
    bases = (scale(stem_c), *(scale(c) for _, c, _, _ in BOTTLENECKS), scale(last_c), *mid_bases)

    stem = ConvSpec("stem", IMAGE_SLOT, 0, 3, 1 if small_input else 2, "relu6", (0,), STEM_HIDDEN)
    blocks = [BlockSpec("stem", (stem,))]
    strides = [s for _, _, _, s in BOTTLENECKS]
    if small_input:
        strides[strides.index(2)] = 1
    in_slot, in_c = 0, stem_c
    for s, ((_, c, n, _), stride) in enumerate(zip(BOTTLENECKS, strides)):
        out_slot = 1 + s
        for b in range(n):
            name, st = f"stage{s + 1}.{b}", stride if b == 0 else 1
            ratios = (in_slot, mid_slot, out_slot)
            convs = (
                ConvSpec(f"{name}.expand", in_slot, mid_slot, 1, 1, "relu6", ratios, BLOCK_HIDDEN),
                ConvSpec(f"{name}.depthwise", mid_slot, mid_slot, 3, st, "relu6", ratios, BLOCK_HIDDEN, depthwise=True),
                ConvSpec(f"{name}.project", mid_slot, out_slot, 1, 1, None, ratios, BLOCK_HIDDEN),
            )
            blocks.append(BlockSpec(name, convs, identity=st == 1 and in_c == c))
            in_slot, in_c, mid_slot = out_slot, c, mid_slot + 1
    last = ConvSpec("last_conv", in_slot, last_slot, 1, 1, "relu6", (in_slot,), STEM_HIDDEN)
    blocks.append(BlockSpec("last_conv", (last,)))
    return ArchSpec(LAYOUT, bases, tuple(blocks), classifier_slot=last_slot, dropout=DROPOUT)


register_family(LAYOUT, build_spec)


@register_model("mobilenetv2_pruningnet")
def mobilenetv2_pruningnet(num_classes: int = 1000, width_mult: float = 1.0, small_input: bool = False) -> PruningNet:
    return PruningNet(build_spec(width_mult, small_input), num_classes)


@register_model("mobilenetv2_prunednet")
def mobilenetv2_prunednet(gene: object = None, num_classes: int = 1000, width_mult: float = 1.0,
                          small_input: bool = False) -> PrunedNet:
    gene = LAYOUT.full() if gene is None else LAYOUT.parse(gene)
    return PrunedNet(build_spec(width_mult, small_input), gene, num_classes)
