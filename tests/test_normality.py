"""What issue 15 adds to the model: the memory-bank normality signal (standardised, leave-one-out), the stored
decision threshold, running from RGB alone, modality dropout, and the global alignment of aux onto RGB."""
import csv

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

import eval as eval_script
import train as train_script
from alignment_aware_fusion import estimate_shift, global_align, warp
from datasets import build_dataset
from datasets.synthesis import AnomalySynthesizer, SynthesisDataset
from knn import MemoryBank
from MambaAlign import MambaAlign, MambaAlignConfig, mambaalign_tiny

SIZE = 128


@pytest.fixture(scope="module")
def fitted():
    """A tiny model (frozen ImageNet EfficientNet-Lite0, offline weights) whose bank holds 24 synthetic disc train
    normals, standardised on 8 others; plus the test split."""
    train = build_dataset("synthetic", None, "disc", "train", SIZE, 3, seed=0)
    test = build_dataset("synthetic", None, "disc", "test", SIZE, 3, seed=0)
    model = mambaalign_tiny(pretrained=True, aux_ch=3).eval()
    clean = AnomalySynthesizer("normals", synth_prob=0.0)
    bank_ds = SynthesisDataset(train, clean, indices=range(24))
    model.fit_bank(DataLoader(bank_ds, batch_size=8), DataLoader(Subset(train, range(24, 32)), batch_size=8))
    return model, train, test, bank_ds


def _bank_maps(model, batch, exclude=None):
    with torch.no_grad():
        aux, _ = model._align(batch["rgb"], batch["aux"])
        feats = model.backbone(batch["rgb"], aux)
        return model._normality(feats, batch["rgb"].shape[-2:], exclude, None)


def test_normality_signal_is_zero_mean_on_unseen_normals_and_grows_under_a_defect(fitted):
    model, train, test, _ = fitted
    normals = next(iter(DataLoader(Subset(train, range(32, 48)), batch_size=16)))   # in neither bank nor holdout
    maps, scores = _bank_maps(model, normals)
    assert maps.shape == (16, 2, SIZE, SIZE) and scores.shape == (16, 2)
    assert abs(float(maps.mean())) < 0.5, float(maps.mean())         # standardised: about N(0, 1) on normals
    defects = [i for i in range(len(test)) if test[i]["label"] == 1][:12]
    bad = next(iter(DataLoader(Subset(test, defects), batch_size=12)))
    maps_bad, scores_bad = _bank_maps(model, bad)
    fused = maps_bad.sum(1)
    inside, outside = fused[bad["mask"][:, 0] > 0.5].mean(), fused[bad["mask"][:, 0] < 0.5].mean()
    assert inside > outside + 2, (float(inside), float(outside))
    assert scores_bad.sum(1).mean() > scores.sum(1).mean() + 2


def test_leave_one_out_makes_a_bank_image_look_unseen(fitted):
    model, _, _, bank_ds = fitted
    batch = next(iter(DataLoader(bank_ds, batch_size=4)))
    own, _ = _bank_maps(model, batch)                                   # its own patches are in the bank
    loo, _ = _bank_maps(model, batch, exclude=batch["index"])
    assert float(own.mean()) < -1 and float(loo.mean()) > float(own.mean()) + 1
    assert abs(float(loo.mean())) < 1


def test_one_modality_encoded_alone_is_that_modalitys_part_of_the_full_encoding(fitted):
    """encode(only=...) (train.py's pool, for views with an anomaly in one modality): that modality's features,
    leave-one-out bank map and score are the full encoding's, bit for bit (the same batch); the other modality's
    features are None and its map and score zero. Models that cannot encode one modality alone refuse."""
    model, _, _, bank_ds = fitted
    batch = next(iter(DataLoader(bank_ds, batch_size=3)))
    with torch.no_grad():
        full = model.encode(batch["rgb"], batch["aux"], exclude=batch["index"])
        for m, name in enumerate(model.modalities):
            one = model.encode(batch["rgb"], batch["aux"], exclude=batch["index"], only=name)
            for pair_one, pair_full in zip(one["feats"], full["feats"]):
                assert torch.equal(pair_one[m], pair_full[m]) and pair_one[1 - m] is None
            for key in ("bank_maps", "bank_scores"):
                assert torch.equal(one[key][:, m], full[key][:, m]), (name, key)
                assert not one[key][:, 1 - m].any(), (name, key)
        with pytest.raises(ValueError, match="only='depth'"):
            model.encode(batch["rgb"], batch["aux"], only="depth")
    shifting = mambaalign_tiny(aux_ch=3, global_align="shift").eval()
    with torch.no_grad():
        assert model.encodes_one_modality() and not shifting.encodes_one_modality()
        with pytest.raises(ValueError, match="encodes_one_modality"):
            shifting.encode(batch["rgb"], batch["aux"], only="rgb")


def test_memory_bank_state_resizes_on_load_and_reads_banks_without_owners():
    bank = MemoryBank(("rgb",), 4, coreset_size=3, projection_dim=0, sigma=0.0)
    bank.build({"rgb": torch.randn(2, 4, 2, 2)}, torch.tensor([7, 9]))
    assert bank.bank_rgb.shape == (3, 4) and set(bank.owner_rgb.tolist()) <= {7, 9}
    fresh = MemoryBank(("rgb",), 4, coreset_size=3, projection_dim=0, sigma=0.0)
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.bank_rgb, bank.bank_rgb) and torch.equal(fresh.owner_rgb, bank.owner_rgb)
    old = {k: v for k, v in bank.state_dict().items() if not k.startswith("owner")}   # a knn file from before
    fresh.load_state_dict(old)
    assert fresh.owner_rgb.tolist() == [-1, -1, -1]


def test_threshold_is_stored_and_applied(tmp_path):
    out = tmp_path / "run"
    train_script.main(train_script.get_args_parser().parse_args(
        ["--dataset", "synthetic", "--object", "ring", "--img_size", "64", "--batch_size", "4", "--epochs", "1",
         "--max_steps", "3", "--val_fraction", "0.1", "--target_fpr", "0.2", "--quiet", "--out_dir", str(out)]))
    ckpt = torch.load(out / "best_checkpoint.pth", weights_only=True)
    cal = ckpt["metrics"]["calibration"]
    model = MambaAlign.from_checkpoint(out / "best_checkpoint.pth")
    assert float(model.threshold) == pytest.approx(cal["threshold"]) and cal["target_fpr"] == 0.2
    # the threshold is the 80th percentile of the held-out normals' scores: at most 20 % of them lie above it
    held = build_dataset("synthetic", None, "ring", "train", 64, 3, seed=0)
    val_idx = train_script.split_train_val(len(held), 0.1, 0)[1]
    batch = next(iter(DataLoader(Subset(held, val_idx), batch_size=len(val_idx))))
    pred = model.predict(batch["rgb"], batch["aux"])
    assert torch.equal(pred["decision"], pred["score_logit"] > model.threshold)
    # (the threshold is one of these scores itself: recomputed in another batch it may move by rounding)
    assert (pred["score_logit"] > model.threshold + 1e-4).float().mean() <= 0.2 + 1e-6
    fresh = mambaalign_tiny(aux_ch=3, normality="none", image_score="head", freeze_backbone=False)
    assert "decision" not in fresh.predict(batch["rgb"][:1], batch["aux"][:1])    # uncalibrated: no decision
    # eval.py writes each test image's decision at that threshold and the rates it gives
    summary = eval_script.main(eval_script.get_args_parser().parse_args(
        ["--checkpoint", str(out / "best_checkpoint.pth"), "--out_dir", str(tmp_path / "eval"), "--quiet"]))
    with open(tmp_path / "eval" / "eval_results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["decision"] == str(int(float(r["score_logit"]) > cal["threshold"])) for r in rows)
    good = [r for r in rows if r["label"] == "0"]
    rates = summary["decision"]["ring"]
    assert rates["threshold"] == pytest.approx(cal["threshold"])
    assert rates["test_fpr"] == pytest.approx(sum(r["decision"] == "1" for r in good) / len(good))


def test_a_model_trained_with_aux_predicts_from_rgb_alone(fitted):
    model, train, _, _ = fitted
    batch = next(iter(DataLoader(Subset(train, range(32, 34)), batch_size=2)))
    alone = model.predict(batch["rgb"])
    explicit = model.predict(batch["rgb"], torch.zeros_like(batch["aux"]))
    assert alone["anomaly_map"].shape == (2, SIZE, SIZE) and torch.isfinite(alone["score_logit"]).all()
    # RGB alone = a zero aux whose bank signal is switched off (what modality dropout trains for), not a zero
    # aux scored against the aux bank
    with torch.no_grad():
        off = model(batch["rgb"], torch.zeros_like(batch["aux"]),
                    aux_present=torch.zeros(2, dtype=torch.bool))
    assert torch.allclose(alone["score_logit"], off["score_logit"], atol=1e-5)
    assert not torch.allclose(alone["score_logit"], explicit["score_logit"], atol=1e-3)


def test_modality_dropout_zeroes_aux_and_drops_an_anomaly_that_only_aux_had():
    ds = build_dataset("synthetic", None, "disc", "train", 64, 3, seed=0)
    synth = AnomalySynthesizer("normals", mode="aux", synth_prob=1.0, aux_dropout=0.5)
    seen = {True: 0, False: 0}
    for i in range(16):
        s = synth(ds[i], np.random.default_rng(i))
        seen[s["aux_present"]] += 1
        if not s["aux_present"]:
            assert s["aux"].abs().sum() == 0 and s["label"] == 0 and s["mask"].sum() == 0
        else:
            assert s["label"] == 1
    assert seen[True] and seen[False]
    keep = AnomalySynthesizer("normals", mode="aux", synth_prob=1.0)(ds[0], np.random.default_rng(0))
    assert keep["aux_present"] and keep["label"] == 1
    with pytest.raises(ValueError, match="aux_dropout"):
        AnomalySynthesizer("normals", aux_dropout=1.5)


def _blob_pair(dx, dy):
    H = W = 128
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")

    def ellipse(cx, cy, r):
        return ((xs - cx) ** 2 / (1.6 * r) ** 2 + (ys - cy) ** 2 / r ** 2 < 1).float()
    rgb = torch.stack([ellipse(60, 70, 20), ellipse(60, 70, 10), ellipse(52, 70, 5)])[None] * 2 - 1
    # another camera: other contrast (dark on bright), noise, and moved by (dx, dy)
    aux = (1 - 3 * ellipse(60 + dx, 70 + dy, 20))[None, None]
    aux = aux + 0.05 * torch.randn(1, 1, H, W, generator=torch.Generator().manual_seed(0))
    return rgb, aux


@pytest.mark.parametrize("dx, dy", [(9.3, -5.6), (-12.0, 7.0), (0.0, 0.0)])
def test_global_alignment_recovers_a_known_shift(dx, dy):
    rgb, aux = _blob_pair(dx, dy)
    aligned, shift = global_align(rgb, aux)
    assert shift[0].tolist() == pytest.approx([-dx, -dy], abs=0.5)
    before = ((aux[0, 0] < -0.5) != (rgb[0, 0] > 0)).float().mean()
    after = ((aligned[0, 0] < -0.5) != (rgb[0, 0] > 0)).float().mean()
    assert after < 0.2 * before + 0.005


def test_global_alignment_follows_a_shift_of_a_real_infrared_image(shared_data):
    ds = build_dataset("mulsenad", shared_data / "MulSen_AD_mini", "button_cell", "train", 256, 1)
    s = ds[0]
    rgb, aux = s["rgb"][None], s["aux"][None]
    base = estimate_shift(rgb, aux)
    moved = warp(aux, torch.full((1, 2, 256, 256), -6.0))      # the infrared content moves 6 px right and down
    assert (estimate_shift(rgb, moved) - base)[0].tolist() == pytest.approx([-6.0, -6.0], abs=1.0)


def test_global_alignment_runs_before_everything_that_reads_aux(fitted):
    model, train, _, _ = fitted
    cfg = MambaAlignConfig.from_dict({**model.config.to_dict(), "global_align": "shift"})
    shifted = MambaAlign(cfg).eval()
    shifted.load_state_dict(model.state_dict())
    s = train[40]
    rgb, aux = s["rgb"][None], s["aux"][None]
    moved = warp(aux, torch.full((1, 2, SIZE, SIZE), 5.0))
    with torch.no_grad():
        out = shifted(rgb, moved)
        a, b = shifted._align(rgb, moved)[0], shifted._align(rgb, aux)[0]
    assert out["global_shift"][0].tolist() == pytest.approx([5.0, 5.0], abs=1.0)
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    assert (a - b)[inner].abs().mean() < 0.1 * (moved - aux)[inner].abs().mean()
    with pytest.raises(ValueError, match="global_align"):
        MambaAlignConfig(global_align="homography")
