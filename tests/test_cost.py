import contextlib
import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, random_gene
from models import create_model, get_family, list_families
from models.cost import cost_model, count_by_hooks, ptflops_macs
from models.cost import main as cost_main

# DESIGN.md's reference table (224x224, 1000 classes).
REFERENCE = [
    ("resnet50", [-1] * 21, 4_089_184_256, 25_557_032),
    ("resnet50", [27, 28, 29, 23, -1, 20, 22, 17, 19, 16, 30, 9, 28, 12, 20, 14, 22, 25, 27, 24, 25], 2_560_041_403, 18_567_340),
    ("resnet50", [20, 13, 16, 16, -1, 21, 9, 23, 21, 21, 14, 26, 19, 17, 27, 19, 15, 11, 17, 22, 25], 1_845_924_958, 14_873_463),
    ("resnet50", [20, 10, 16, 17, -1, 9, 3, 7, 23, 10, 19, 12, 16, 20, 17, 13, 22, 11, 18, 19, 24], 1_485_046_475, 13_954_298),
    ("resnet50", [19, 9, 15, 13, 10, 9, 10, 6, 9, 13, 11, 12, 7, 18, 7, 13, 12, 10, 19, 18], 1_027_554_986, 10_567_336),
    ("mobilenetv2", [-1] * 26, 569_521_240, 5_313_198),
    ("mobilenetv2", [7, 4, 5, 7, 6, 3, 9, 11, -1, 19, 4, 9, 11, 9, 9, 6, 10, 3, 6, 3, 7, 5, 17, 8, 8, 11], 77_674_920, 1_995_881),
]


@pytest.mark.parametrize("arch, gene, macs, params", REFERENCE)
def test_reference_table(arch, gene, macs, params):
    cost = cost_model(arch)(get_family(arch).layout.parse(gene))
    assert (cost.macs, cost.params) == (macs, params)


@pytest.mark.parametrize("arch, gene, macs, params", REFERENCE[:1] + REFERENCE[4:6])
def test_reference_models_count_the_same(arch, gene, macs, params):
    net = create_model(f"{arch}_prunednet", gene=gene)
    assert sum(p.numel() for p in net.parameters()) == params
    assert count_by_hooks(net, 224) == macs


@pytest.mark.parametrize("arch", list_families())
@pytest.mark.parametrize("input_size, width_mult, num_classes", [(32, 0.25, 10), (64, 0.5, 100), (96, 0.3, 7), (57, 1.0, 10)])
def test_cost_equals_hook_count(arch, input_size, width_mult, num_classes):
    rng = random.Random(input_size)
    layout = get_family(arch).layout
    model = cost_model(arch, input_size, num_classes, width_mult)
    for _ in range(3):
        gene = random_gene(layout, rng)
        net = create_model(f"{arch}_prunednet", gene=gene, num_classes=num_classes, width_mult=width_mult,
                           small_input=input_size <= 32)
        cost = model(gene)
        assert cost.macs == count_by_hooks(net, input_size)
        assert cost.params == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("arch", list_families())
def test_batch_cost_equals_single(arch):
    rng = random.Random(7)
    layout = get_family(arch).layout
    narrowest = layout.validate([30 if i in layout.fixed else 0 for i in range(len(layout))])
    genes = [random_gene(layout, rng) for _ in range(200)] + [layout.full(), narrowest]
    model = cost_model(arch)
    macs, params = model.batch(np.array(genes))
    assert macs.tolist() == [model(g).macs for g in genes]
    assert params.tolist() == [model(g).params for g in genes]


def test_ptflops_aten_agrees_up_to_classifier_bias():
    gene = REFERENCE[3][1]
    net = create_model("resnet50_prunednet", gene=gene, num_classes=10, width_mult=0.25)
    ours = cost_model("resnet50", 64, 10, 0.25)(get_family("resnet50").layout.parse(gene)).macs
    # ptflops' aten backend also counts the 10 bias additions of the classifier's addmm.
    assert ptflops_macs(net, 64) == ours + 10


def run_cli(*args: str, process: bool = False) -> subprocess.CompletedProcess:
    """``python -m models.cost args``: as a process, or (fast) its ``main`` in this one."""
    if process:
        return subprocess.run([sys.executable, "-m", "models.cost", *args], cwd=ROOT, capture_output=True, text=True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cost_main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_cli_json():
    arch, gene, macs, params = REFERENCE[3]
    r = run_cli("--arch", "resnet50_prunednet", "--gene", str(gene + [42.506]), "--json", process=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["macs"] == macs and out["params"] == params and out["gene"] == gene
    assert len(out["channels"]) == 1 + 16 + 1


def test_cli_text_with_table():
    r = run_cli("--arch", "mobilenetv2", "--gene", str([-1] * 26), "--table")
    assert r.returncode == 0, r.stderr
    assert "569,521,240" in r.stdout and "569.52 MMac" in r.stdout and "5,313,198" in r.stdout
    assert "stage7.0" in r.stdout and "classifier" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--arch", "resnet50", "--gene", "[1, 2, 3]"], "3 elements"),
    (["--arch", "vgg16", "--gene", "[1]"], "unknown arch 'vgg16'"),
    (["--arch", "resnet50", "--gene", str([1] * 4 + [7] + [1] * 16)], "position 4 (stage4)"),
])
def test_cli_bad_input_is_one_line_exit_2(args, words):
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert words in r.stderr and "Traceback" not in r.stderr


def test_cli_reads_the_official_35_id_mobilenetv2_gene():
    from test_gene import OFFICIAL_MBV2_MID, OFFICIAL_MBV2_OUT

    r = run_cli("--arch", "mobilenetv2", "--gene", str(OFFICIAL_MBV2_OUT + OFFICIAL_MBV2_MID), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["gene"][:9] == [14, 12, 11, 8, 7, 8, 14, 8, -1]
    # conv + classifier MACs of the channels the official code builds (its counter adds BN, pooling and the
    # classifier bias on top: 108.40 M there)
    assert 104.8e6 < out["macs"] < 104.9e6
