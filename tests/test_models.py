import random

import pytest
import torch
import torch.nn.functional as F

from conftest import random_gene
from models import (
    PrunedNet,
    PruningNet,
    create_model,
    get_family,
    is_pruningnet,
    list_families,
    list_models,
    recalibrate_bn,
)
from models.registry import register_model

ARCHS = list_models()
TINY = dict(num_classes=5, width_mult=0.125, small_input=True)


def test_registry_has_readme_archs():
    assert ARCHS == ["mobilenetv2_prunednet", "mobilenetv2_pruningnet", "resnet50_prunednet", "resnet50_pruningnet"]


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet50_prunednet")(lambda: None)
    with pytest.raises(ValueError, match="unknown arch 'resnet18'"):
        create_model("resnet18")


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shape_no_nan_and_gradients(arch, rng):
    torch.manual_seed(0)
    model = create_model(arch, **TINY)
    x = torch.randn(4, 3, 16, 16)
    if is_pruningnet(arch):
        gene = random_gene(get_family(arch).layout, rng)
        out = model(x, gene)
    else:
        out = model(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", list_families())
def test_pruningnet_generators_get_gradients_only_on_active_crop(family, rng):
    torch.manual_seed(0)
    net = create_model(f"{family}_pruningnet", **TINY)
    gene = random_gene(net.spec.layout, rng)
    net(torch.randn(2, 3, 16, 16), gene).sum().backward()
    ch = net.spec.channels(gene)
    for m in net.convs.values():
        cout = ch[m.spec.out_slot]
        assert m.fc1.weight.grad.abs().sum() > 0 and m.weight2.grad[:cout].abs().sum() > 0
        assert m.weight2.grad[cout:].abs().sum() == 0  # pruned output channels are not generated


@pytest.mark.parametrize("family", list_families())
def test_prunednet_conv_shapes_follow_gene(family, rng):
    gene = random_gene(get_family(family).layout, rng)
    net = create_model(f"{family}_prunednet", gene=gene)
    ch = net.spec.channels(net.gene)
    for spec, m in zip(net.spec.convs(), net.conv_bns().values(), strict=True):
        assert m.conv.out_channels == ch[spec.out_slot]
        assert m.conv.in_channels == (3 if spec.in_slot < 0 else ch[spec.in_slot])
    assert net.classifier.in_features == {"resnet50": 2048, "mobilenetv2": 1280}[family]


@pytest.mark.parametrize("family", list_families())
def test_zero_init_residual_starts_every_residual_block_as_its_shortcut(family, rng):
    net = create_model(f"{family}_prunednet", gene=random_gene(get_family(family).layout, rng)).eval()
    net.zero_init_residual()
    x = torch.randn(2, 3, 32, 32)
    residual = 0
    for blk in net.blocks:
        y = blk(x)
        if blk.shortcut is not None or blk.identity:
            residual += 1
            skip = blk.shortcut(x) if blk.shortcut is not None else x
            assert torch.equal(y, blk.pool(blk.act(skip)))
        else:
            assert torch.all(blk.body[-1].bn.weight == 1)  # a block without a shortcut keeps its init
        x = y
    assert residual == {"resnet50": 16, "mobilenetv2": 10}[family]


def test_mobilenetv2_expand_width_uses_input_channels():
    net = create_model("mobilenetv2_prunednet")
    stage2_first = net.blocks[2].body  # [6, 33, 2, 2]: input 22 channels → expand 22 * 6
    assert stage2_first[0].conv.in_channels == 22 and stage2_first[0].conv.out_channels == 132
    residual = [b.identity for b in net.blocks[1:-1]]
    assert residual == [False, False, True, False, True, True, False, True, True, True, False, True, True,
                        False, True, True, False]


@pytest.mark.parametrize("family", list_families())
@pytest.mark.parametrize("small_input, size", [(True, 16), (False, 48)])
def test_materialized_prunednet_matches_pruningnet(family, small_input, size):
    torch.manual_seed(1)
    rng = random.Random(size)
    net = create_model(f"{family}_pruningnet", num_classes=7, width_mult=0.25, small_input=small_input)
    x = torch.randn(6, 3, size, size)
    for _ in range(3):
        gene = random_gene(net.spec.layout, rng)
        recalibrate_bn(net, [torch.randn(8, 3, size, size) for _ in range(2)], gene)
        pruned = net.materialize(gene)
        assert isinstance(pruned, PrunedNet) and not any(isinstance(m, PruningNet) for m in pruned.modules())
        with torch.no_grad():
            torch.testing.assert_close(pruned.eval()(x), net.eval()(x, gene), rtol=1e-4, atol=1e-4)


def test_materialize_generates_weights_once(monkeypatch):
    net = create_model("mobilenetv2_pruningnet", **TINY)
    calls = []
    original = PruningNet.generate
    monkeypatch.setattr(PruningNet, "generate", lambda self, g: calls.append(g) or original(self, g))
    gene = net.spec.layout.full()
    pruned = net.materialize(gene)
    for _ in range(3):
        pruned(torch.randn(2, 3, 16, 16))
    net.train()(torch.randn(2, 3, 16, 16), gene)
    assert len(calls) == 2  # once for materialize, once for the PruningNet step; none per batch


def test_recalibration_is_exact_average():
    net = create_model("resnet50_prunednet", **TINY)
    batches = [torch.randn(4, 3, 16, 16) + i for i in range(3)]
    recalibrate_bn(net, batches)
    stem_bn = net.blocks[0].body[0].bn
    with torch.no_grad():
        feats = [net.blocks[0].body[0].conv(b) for b in batches]
    expected = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(stem_bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert not net.training and stem_bn.momentum == 0.1


@pytest.mark.parametrize("family", list_families())
def test_pruningnet_step_decreases_loss_on_fixed_batch(family):
    torch.manual_seed(0)
    net = create_model(f"{family}_pruningnet", **TINY)
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    layout = net.spec.layout
    gene = layout.validate([30 if i in layout.fixed else 15 for i in range(len(layout))])
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(net(x, gene), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.75 * losses[0]


def test_full_width_resnet50_pruningnet_size():
    with torch.device("meta"):  # shapes only: the 3 GB of weights are never allocated or initialised
        net = create_model("resnet50_pruningnet", num_classes=1000)
    n = sum(p.numel() for p in net.parameters())
    assert 770e6 < n < 780e6  # every conv weight generated by an h=32 linear: ~776M parameters
    # per-scale BN: 31 BNs per conv output except stage4's fixed ones
    assert len(net.convs["stem"].bns) == 31 and len(net.convs["stage4_2_conv3"].bns) == 1


@pytest.mark.parametrize("family", list_families())
def test_generated_widest_weights_start_at_kaiming_scale(family):
    torch.manual_seed(0)
    net = create_model(f"{family}_pruningnet", num_classes=10, width_mult=0.25)
    weights = net.generate(net.spec.layout.full())
    for m in net.convs.values():
        w = weights[m.spec.name]
        kaiming = (2.0 / (w.shape[0] * w[0, 0].numel())) ** 0.5  # the PrunedNet's fan-out init
        if w.numel() >= 500:  # enough values for a stable std
            assert w.std().item() == pytest.approx(kaiming, rel=0.2), m.spec.name


@pytest.mark.parametrize("family", list_families())
def test_a_pruningnet_checkpoint_of_numbered_generators_loads_by_name(family):
    """Checkpoints written before the generators were keyed by conv name (``convs.{i}.``, spec order)."""
    torch.manual_seed(0)
    net = create_model(f"{family}_pruningnet", **TINY)
    index = {c.name.replace(".", "_"): i for i, c in enumerate(net.spec.convs())}
    old = {}
    for key, value in net.state_dict().items():
        head, _, rest = key.partition(".")
        if head == "convs":
            name, _, leaf = rest.partition(".")
            key = f"convs.{index[name]}.{leaf}"
        old[key] = value
    assert "convs.0.weight2" in old and not any(k.startswith("convs.stem.") for k in old)
    fresh = create_model(f"{family}_pruningnet", **TINY)
    fresh.load_state_dict(old)  # strict: every key found under its name
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in net.state_dict().items())
