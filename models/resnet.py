"""ResNet50: stage table, gene layout, PruningNet and PrunedNet.

Gene (21 ids): ``[stem, stage1, stage2, stage3, stage4, mid_1 … mid_16]``. All blocks of a stage
share the stage's output ratio (their outputs are added); ``mid_k`` is block k's bottleneck width;
``stage4`` stays full width because the classifier input is fixed. The official MetaPruning code
writes the same gene without ``stage4`` (20 ids); both forms parse.
"""
from __future__ import annotations

from .gene import GeneLayout, OfficialForm
from .pruningnet import IMAGE_SLOT, ArchSpec, BlockSpec, ConvSpec, PrunedNet, PruningNet
from .registry import register_family, register_model

STEM_CHANNELS = 64
STAGE_OUT = (256, 512, 1024, 2048)
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_STRIDE = (1, 2, 2, 2)
EXPANSION = 4
GEN_HIDDEN = 32

LAYOUT = GeneLayout(
    family="resnet50",
    names=("stem", *(f"stage{i + 1}" for i in range(4)), *(f"mid_{k + 1}" for k in range(sum(STAGE_BLOCKS)))),
    fixed=(4,),
    # the official code's 20 ids: [stem, stage1, stage2, stage3, mid_1 ... mid_16], stage4 always full
    official=OfficialForm(20, ((0,), (1,), (2,), (3,), None, *((4 + k,) for k in range(sum(STAGE_BLOCKS))))),
)


def build_spec(width_mult: float = 1.0, small_input: bool = False) -> ArchSpec:
    """The ResNet50 structure; ``small_input`` swaps the 7x7/2 stem and max-pool for a 3x3/1 stem."""
    scale = lambda c: max(1, int(round(c * width_mult)))
    mids = [c // EXPANSION for c, n in zip(STAGE_OUT, STAGE_BLOCKS) for _ in range(n)]
    bases = (scale(STEM_CHANNELS), *map(scale, STAGE_OUT), *map(scale, mids))

    stem = ConvSpec("stem", IMAGE_SLOT, 0, 3 if small_input else 7, 1 if small_input else 2, "relu", (0,), GEN_HIDDEN)
    blocks = [BlockSpec("stem", (stem,), maxpool=not small_input)]
    in_slot, mid_slot = 0, 5
    for s, (n, stride) in enumerate(zip(STAGE_BLOCKS, STAGE_STRIDE)):
        out_slot = 1 + s
        for b in range(n):
            name, st = f"stage{s + 1}.{b}", stride if b == 0 else 1
            ratios = (in_slot, mid_slot, out_slot)
            convs = (
                ConvSpec(f"{name}.conv1", in_slot, mid_slot, 1, 1, "relu", ratios, GEN_HIDDEN),
                ConvSpec(f"{name}.conv2", mid_slot, mid_slot, 3, st, "relu", ratios, GEN_HIDDEN),
                ConvSpec(f"{name}.conv3", mid_slot, out_slot, 1, 1, None, ratios, GEN_HIDDEN),
            )
            shortcut = (ConvSpec(f"{name}.shortcut", in_slot, out_slot, 1, st, None, ratios, GEN_HIDDEN)
                        if b == 0 else None)
            blocks.append(BlockSpec(name, convs, shortcut, identity=b > 0, act="relu"))
            in_slot, mid_slot = out_slot, mid_slot + 1
    return ArchSpec(LAYOUT, bases, tuple(blocks), classifier_slot=4)


register_family(LAYOUT, build_spec)


@register_model("resnet50_pruningnet")
def resnet50_pruningnet(num_classes: int = 1000, width_mult: float = 1.0, small_input: bool = False) -> PruningNet:
    return PruningNet(build_spec(width_mult, small_input), num_classes)


@register_model("resnet50_prunednet")
def resnet50_prunednet(gene: object = None, num_classes: int = 1000, width_mult: float = 1.0,
                       small_input: bool = False) -> PrunedNet:
    gene = LAYOUT.full() if gene is None else LAYOUT.parse(gene)
    return PrunedNet(build_spec(width_mult, small_input), gene, num_classes)
