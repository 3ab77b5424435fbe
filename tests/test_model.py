"""The MambaAlign model: shapes in every mode, gradients, ablations, backbone norms and weights,
checkpoints, and that the Alignment-Aware Fusion really learns a shift."""
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from alignment_aware_fusion import AlignmentAwareFusion, warp
from conftest import fit_random_bank
from MambaAlign import MambaAlign, MambaAlignConfig, mambaalign_tiny
from rgbx_backbone import DualNorm, RGBXBackbone

H, W = 96, 128


def _inputs(aux_ch, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(batch, 3, H, W, generator=g)
    aux = torch.randn(batch, aux_ch, H, W, generator=g) if aux_ch else None
    return rgb, aux


@pytest.mark.parametrize("aux_ch", [0, 1, 3])
def test_output_keys_and_shapes(aux_ch, fit_bank):
    model = fit_bank(mambaalign_tiny(aux_ch=aux_ch), H, W)
    out = model(*_inputs(aux_ch))
    assert out["seg_logits"].shape == (2, 1, H, W)
    assert out["anomaly_map"].shape == (2, 1, H, W)
    assert out["score_logit"].shape == (2,) and out["score"].shape == (2,)
    assert 0 <= out["anomaly_map"].min() and out["anomaly_map"].max() <= 1
    assert 0 <= out["score"].min() and out["score"].max() <= 1
    for k in ("seg_logits", "score_logit"):
        assert torch.isfinite(out[k]).all()
    if aux_ch == 0:
        assert model.cmi is None and "aux" not in model.reduce and not hasattr(model.backbone, "aux_conv1")


def test_every_parameter_gets_a_gradient(fit_bank):
    model = fit_bank(mambaalign_tiny(aux_ch=3, use_pmm=True), H, W)
    out = model(*_inputs(3))
    (out["seg_logits"].square().mean() + out["score_logit"].square().mean()).backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, missing


@pytest.mark.parametrize("switch", ["use_pmm", "use_cmi", "use_aaf"])
def test_each_ablation_switch_builds_and_runs(switch, fit_bank):
    model = fit_bank(mambaalign_tiny(aux_ch=1, **{switch: False}), H, W)
    out = model(*_inputs(1))
    assert out["seg_logits"].shape == (2, 1, H, W) and torch.isfinite(out["seg_logits"]).all()
    names = [n for n, _ in model.named_parameters()]
    piece = {"use_pmm": "pmm.", "use_cmi": "cmi.", "use_aaf": ".offset."}[switch]
    assert not any(piece in n for n in names), f"{switch}=False still builds {piece}"
    full = [n for n, _ in mambaalign_tiny(aux_ch=1, use_pmm=True, use_cmi=True, use_aaf=True).named_parameters()]
    assert any(piece in n for n in full)


def test_modality_norms_separate_and_convs_shared():
    bb = RGBXBackbone("resnet18", aux_ch=1, pretrained=False).train()
    rgb = torch.randn(2, 3, 64, 64)
    aux = 5 + 3 * torch.randn(2, 1, 64, 64)
    bb(rgb, aux)
    norm = bb.layer1[0].bn1
    assert isinstance(norm, DualNorm)
    assert not torch.allclose(norm.rgb.running_mean, norm.aux.running_mean)
    assert norm.rgb.weight.data_ptr() != norm.aux.weight.data_ptr()
    conv_params = [n for n, _ in bb.named_parameters() if "conv" in n or "downsample.0" in n]
    assert [n for n in conv_params if "aux" in n] == ["aux_conv1.weight"]  # the only modality-specific conv
    assert bb.layer1[0].conv1.weight.shape == (64, 64, 3, 3)
    assert bb.out_channels == {3: 128, 4: 256, 5: 512} and bb.strides == {3: 8, 4: 16, 5: 32}
    feats = bb(rgb, aux)
    for (fr, fa), s in zip(feats, (8, 16, 32)):
        assert fr.shape[2:] == (64 // s, 64 // s) and fa.shape == fr.shape


def test_aux_stem_initialised_from_rgb_stem():
    bb = RGBXBackbone("resnet18", aux_ch=1)
    expected = bb.conv1.weight.mean(1, keepdim=True) * 3
    assert torch.allclose(bb.aux_conv1.weight, expected)
    bb3 = RGBXBackbone("resnet18", aux_ch=3)
    assert torch.equal(bb3.aux_conv1.weight, bb3.conv1.weight)


def test_weights_path_fills_both_branches(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-1, 1)
        ref.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    bb = RGBXBackbone("resnet18", aux_ch=3, weights_path=str(path))
    assert torch.equal(bb.conv1.weight, ref.conv1.weight)
    assert torch.equal(bb.aux_conv1.weight, ref.conv1.weight)
    assert torch.equal(bb.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    for branch in (bb.bn1.rgb, bb.bn1.aux):
        assert torch.equal(branch.weight, ref.bn1.weight)
        assert torch.equal(branch.running_mean, ref.bn1.running_mean)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        RGBXBackbone("resnet18", aux_ch=3, weights_path=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(RuntimeError, match="missing"):
        RGBXBackbone("resnet18", aux_ch=3, weights_path=str(bad))


def test_pretrained_without_network_names_the_cache_file(monkeypatch, tmp_path):
    import torchvision.models._api as api
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *a, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as err:
        RGBXBackbone("resnet18", aux_ch=1, pretrained=True)
    msg = str(err.value)
    assert str(tmp_path) in msg and "resnet18-" in msg and "--backbone_weights" in msg


def test_checkpoint_round_trip(tmp_path, fit_bank):
    model = fit_bank(mambaalign_tiny(aux_ch=1), H, W).eval()
    rgb, aux = _inputs(1, batch=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded["config"], dict)
    again = MambaAlign.from_checkpoint(path)
    assert again.config == model.config
    a, b = model(rgb, aux), again.eval()(rgb, aux)
    assert torch.equal(a["seg_logits"], b["seg_logits"]) and torch.equal(a["score"], b["score"])
    raw = tmp_path / "raw.pth"
    torch.save(model.state_dict(), raw)
    with pytest.raises(ValueError, match="config"):
        MambaAlign.from_checkpoint(raw)
    c = MambaAlign.from_checkpoint(raw, config=model.config.to_dict()).eval()
    assert torch.equal(c(rgb, aux)["seg_logits"], a["seg_logits"])
    pred = again.predict(rgb[0], aux[0])
    assert pred["anomaly_map"].shape == (1, H, W) and pred["score"].shape == (1,)


def test_bad_inputs_are_reported():
    model = mambaalign_tiny(aux_ch=1)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 90, 128), torch.randn(1, 1, 90, 128))
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="freeze_backbone"):
        MambaAlignConfig(normality="bank")
    with pytest.raises(ValueError, match="aux_ch"):
        MambaAlignConfig(aux_ch=2)
    with pytest.raises(ValueError, match="preset"):
        MambaAlignConfig.preset("huge")


def test_presets():
    tiny, base = MambaAlignConfig.preset("tiny"), MambaAlignConfig.preset("base", aux_ch=1)
    assert tiny.backbone == "efficientnet_lite0" and base.backbone == "wide_resnet50_2" and base.aux_ch == 1
    assert tiny.normality == base.normality == "bank" and tiny.freeze_backbone and base.freeze_backbone


@pytest.mark.slow
def test_base_preset_runs(fit_bank):
    from MambaAlign import mambaalign_base
    model = fit_bank(mambaalign_base(aux_ch=3), 64, 64).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))
    assert out["seg_logits"].shape == (1, 1, 64, 64)


def test_warp_moves_by_the_offset():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 5] = 1
    off = torch.zeros(1, 2, 8, 8)
    off[:, 0] = 2.0  # sample 2 px to the right
    y = warp(x, off)
    assert y[0, 0, 3, 3] == 1 and y.sum() == 1


def _toy_batch(g, n=8, size=32, shift=3):
    tex = F.avg_pool2d(torch.randn(n, 1, size + 8, size + 8, generator=g), 3, 1, 1)[..., 4:-4, 4:-4]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.randint(6, size - 6, (n, 2), generator=g)
    mask = (((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) <= 16).float().unsqueeze(1)
    # The defect is visible only in aux; aux is the scene shifted right by `shift` pixels.
    aux = torch.roll(tex + 2 * mask, shifts=shift, dims=3)
    return tex, aux, mask


@pytest.mark.slow
def test_aaf_learns_to_undo_a_shift():
    """aux = RGB scene shifted 3 px right, defect only in aux, mask in RGB coordinates: to segment, AAF must
    sample aux 3 px to the right, so the learned x-offsets at the finest stage go positive."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    aaf = AlignmentAwareFusion((4, 4, 4), 16)
    head = nn.Conv2d(16, 1, 1)
    opt = torch.optim.Adam(list(aaf.parameters()) + list(head.parameters()), lr=3e-3)

    def pyramid(x):
        x = x.repeat(1, 4, 1, 1)
        return [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]

    for _ in range(200):
        rgb, aux, mask = _toy_batch(g)
        fused, _ = aaf(pyramid(rgb), pyramid(aux))
        loss = F.binary_cross_entropy_with_logits(head(fused[0]), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rgb, aux, mask = _toy_batch(g)
    with torch.no_grad():
        _, offsets = aaf(pyramid(rgb), pyramid(aux))
    dx, dy = offsets[0][:, 0].mean().item(), offsets[0][:, 1].mean().item()
    assert dx > 1.0 and abs(dy) < dx / 2, (dx, dy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mixed_precision_step_matches_fp32():
    """On a GPU: the autocast context train.py uses (bf16 where supported) runs forward and backward with finite
    gradients everywhere, and its maps stay close to the float32 ones."""
    from engine import autocast_context
    torch.manual_seed(0)
    model = fit_random_bank(mambaalign_tiny(aux_ch=3), H, W).cuda().eval()
    rgb, aux = (t.cuda() for t in _inputs(3))
    head_dtypes = []
    model.seg_head.register_forward_hook(lambda mod, inp, out: head_dtypes.append(out.dtype))
    with torch.no_grad():
        ref = model(rgb, aux)
        with autocast_context(torch.device("cuda"), True):
            low = model(rgb, aux)
    # The convolutions run in low precision; the final upsampling is one of autocast's float32 ops.
    assert head_dtypes[0] == torch.float32 and head_dtypes[1] in (torch.bfloat16, torch.float16)
    torch.testing.assert_close(low["anomaly_map"].float(), ref["anomaly_map"], atol=0.05, rtol=0)
    model.train()
    with autocast_context(torch.device("cuda"), True):
        out = model(rgb, aux)
    (out["seg_logits"].float().square().mean() + out["score_logit"].float().square().mean()).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad
    pred = model.predict(rgb, aux)
    assert pred["anomaly_map"].device.type == "cpu" and pred["anomaly_map"].dtype == torch.float32


def test_config_holds_architecture_only_and_reads_older_configs():
    from dataclasses import fields
    names = {f.name for f in fields(MambaAlignConfig)}
    assert not names & {"pretrained", "backbone_weights", "scan_backend"}
    old = {**MambaAlignConfig.preset("tiny", aux_ch=1).to_dict(), "pretrained": True, "backbone_weights": "x.pth",
           "scan_backend": "torch"}      # a checkpoint written when these runtime choices lived in the config
    assert MambaAlignConfig.from_dict(old) == MambaAlignConfig.preset("tiny", aux_ch=1)
    with pytest.raises(ValueError, match="scan_backend"):
        MambaAlign(MambaAlignConfig.preset("tiny"), scan_backend="fast")


def test_from_checkpoint_returns_eval_mode(tmp_path):
    model = mambaalign_tiny(aux_ch=0)
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, tmp_path / "m.pth")
    assert not MambaAlign.from_checkpoint(tmp_path / "m.pth").training


def test_stage2_skip_follows_aaf_offsets():
    g = torch.Generator().manual_seed(0)
    rgb2, aux2 = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    off = torch.zeros(1, 2, 8, 8)
    off[:, 0] = 1.0                              # one stride-8 pixel = two stride-4 pixels, to the right
    rgb_out, aux_out = MambaAlign._aligned_skip((rgb2, aux2), off)
    assert torch.equal(rgb_out, rgb2)
    assert torch.allclose(aux_out[..., :, :-2], aux2[..., :, 2:], atol=1e-5)
    assert MambaAlign._aligned_skip((rgb2, aux2), None)[1] is aux2          # no AAF: nothing to follow
    assert MambaAlign._aligned_skip((rgb2, None), off) == [rgb2]
