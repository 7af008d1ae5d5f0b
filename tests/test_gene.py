import random

import pytest

from models import SCALES, get_family
from models.gene import channels

R50 = get_family("resnet50").layout
MBV2 = get_family("mobilenetv2").layout
SEED_1500 = [20, 10, 16, 17, -1, 9, 3, 7, 23, 10, 19, 12, 16, 20, 17, 13, 22, 11, 18, 19, 24]
OFFICIAL_1G = [19, 9, 15, 13, 10, 9, 10, 6, 9, 13, 11, 12, 7, 18, 7, 13, 12, 10, 19, 18]


def test_scale_grid():
    assert len(SCALES) == 31
    assert SCALES[0] == 0.10 and SCALES[-1] == 1.0 and SCALES[20] == 0.70
    assert all(b - a == pytest.approx(0.03) for a, b in zip(SCALES, SCALES[1:]))


def test_channels_truncate_the_float_product():
    # 100 * 0.29 is 28.999999999999996 in binary floating point: the seed truncates it to 28.
    assert channels(100, 6) == 28
    assert channels(64, 20) == 44
    assert channels(2048, -1) == 2048
    assert channels(3, 0) == 1  # never zero channels


def test_layout_names():
    assert len(R50) == 21 and R50.names[4] == "stage4" and R50.names[5] == "mid_1" and R50.names[-1] == "mid_16"
    assert len(MBV2) == 26 and MBV2.names[8] == "last_conv" and MBV2.names[-1] == "mid_17"


@pytest.mark.parametrize("form", [
    SEED_1500,
    SEED_1500 + [42.506],
    str(SEED_1500 + [42.506]),
    " [20, 10, 16, 17, -1, 9, 3, 7, 23, 10, 19, 12, 16, 20, 17, 13, 22, 11, 18, 19, 24] ",
    tuple(SEED_1500),
])
def test_parse_accepts_readme_forms(form):
    gene = R50.parse(form)
    assert gene == tuple(30 if g == -1 else g for g in SEED_1500)


def test_parse_official_short_form_inserts_stage4():
    gene = R50.parse(OFFICIAL_1G)
    assert len(gene) == 21 and gene[4] == 30
    assert gene[:4] == tuple(OFFICIAL_1G[:4]) and gene[5:] == tuple(OFFICIAL_1G[4:])
    assert R50.parse(OFFICIAL_1G + [40.1]) == gene


# The official code's MobileNetV2 gene (mobilenetv2/evaluating/mobilenet_v2.py of liuzechun/MetaPruning):
# 18 per-layer output ids, then 17 expand ids.
OFFICIAL_MBV2_OUT = [14, 12, 11, 11, 8, 8, 8, 7, 7, 7, 7, 8, 8, 8, 14, 14, 14, 8]
OFFICIAL_MBV2_MID = [6, 5, 2, 15, 7, 17, 14, 5, 11, 12, 12, 11, 6, 16, 14, 13, 14]


def test_parse_official_mobilenetv2_35_id_form():
    gene = MBV2.parse(OFFICIAL_MBV2_OUT + OFFICIAL_MBV2_MID)
    # one id per stage (the first block's, the others equal it), the fixed last conv, the 17 expand ids
    assert MBV2.format(gene) == [14, 12, 11, 8, 7, 8, 14, 8, -1, *OFFICIAL_MBV2_MID]
    assert MBV2.parse(OFFICIAL_MBV2_OUT + OFFICIAL_MBV2_MID + [33.2]) == gene  # with the search's error
    # the channels the official code builds from it (its int(base * ratio) on the same base table)
    spec = get_family("mobilenetv2").build_spec()
    ch = spec.channels(gene)
    assert ch[:8] == [22, 10, 14, 14, 27, 44, 116, 152]
    assert ch[9:] == [12, 33, 31, 108, 81, 161, 137, 132, 227, 242, 242, 340, 221, 459, 698, 658, 698]


def test_an_official_mobilenetv2_gene_with_untied_stage_blocks_is_refused():
    untied = list(OFFICIAL_MBV2_OUT)
    untied[5] = 9  # stage 3's second block differs from its first
    with pytest.raises(ValueError, match=r"official gene positions 4, 5, 6 \(stage3\) hold 8, 9, 8"):
        MBV2.parse(untied + OFFICIAL_MBV2_MID)
    with pytest.raises(ValueError, match="or the official MetaPruning code's 35 ids; got 34"):
        MBV2.parse(OFFICIAL_MBV2_OUT + OFFICIAL_MBV2_MID[:-1])


def test_format_writes_fixed_positions_as_minus_one():
    gene = R50.parse(SEED_1500)
    assert R50.format(gene) == SEED_1500
    assert R50.format(gene, 42.506) == SEED_1500 + [42.506]
    assert R50.format(R50.full())[4] == -1 and R50.format(R50.full())[0] == 30


@pytest.mark.parametrize("bad, words", [
    (SEED_1500[:-2], ["19 elements"]),
    (SEED_1500 + [1.0, 2.0], ["23 elements"]),
    (SEED_1500[:6] + [31] + SEED_1500[7:], ["position 6", "mid_2", "31"]),
    (SEED_1500[:6] + [-2] + SEED_1500[7:], ["position 6", "-2"]),
    (SEED_1500[:3] + [2.5] + SEED_1500[4:], ["position 3", "stage3", "2.5"]),
    (SEED_1500[:3] + ["a"] + SEED_1500[4:], ["position 3", "'a'"]),
    (SEED_1500[:4] + [12] + SEED_1500[5:], ["position 4", "stage4", "-1 or 30", "12"]),
    ("[1, 2,", ["cannot read a gene"]),
    ("7", ["list of ids"]),
    (SEED_1500 + ["err"], ["top-1 error", "'err'"]),
    (SEED_1500[:3] + [True] + SEED_1500[4:], ["position 3", "integer id", "True"]),
    (SEED_1500[:3] + [float("nan")] + SEED_1500[4:], ["position 3", "integer id", "nan"]),
    (SEED_1500 + [True], ["top-1 error", "True"]),
    (SEED_1500 + [float("nan")], ["top-1 error", "nan"]),
    ("[20, 10, 11, 12, nan]", ["cannot read a gene"]),
])
def test_parse_errors_name_position_and_value(bad, words):
    with pytest.raises(ValueError) as e:
        R50.parse(bad)
    for w in words:
        assert w in str(e.value)


def test_mobilenetv2_last_conv_is_fixed():
    gene = [7, 4, 5, 7, 6, 3, 9, 11, -1, 19, 4, 9, 11, 9, 9, 6, 10, 3, 6, 3, 7, 5, 17, 8, 8, 11]
    assert MBV2.parse(gene + [58.46])[8] == 30
    gene[8] = 5
    with pytest.raises(ValueError, match=r"position 8 \(last_conv\) must be -1 or 30"):
        MBV2.parse(gene)
    with pytest.raises(ValueError, match="26 ids"):
        MBV2.parse(gene[:25])


def test_free_positions_exclude_fixed():
    assert 4 not in R50.free_positions() and len(R50.free_positions()) == 20
    assert 8 not in MBV2.free_positions() and len(MBV2.free_positions()) == 25


def test_sample_within_an_id_range():
    rng, free = random.Random(0), set(R50.free_positions())
    genes = [R50.sample(rng, 5, 7) for _ in range(200)]
    assert {g[i] for g in genes for i in free} == {5, 6, 7}
    assert all(g[i] == R50.full()[i] for g in genes for i in range(len(R50)) if i not in free)
