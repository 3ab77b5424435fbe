"""The memory-bank baseline: coreset, nearest-neighbour search, and train.py --model knn -> eval.py."""
import json

import pytest
import torch

import eval as eval_script
import train as train_script
from engine import load_model
from knn import KNNConfig, PatchKNN, gaussian_blur, greedy_coreset, nearest_distance


def test_greedy_coreset_is_k_center_greedy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    idx = greedy_coreset(x, 20, projection_dim=0, seed=3)
    # brute force: same start, then always the point farthest from the chosen set
    chosen = [int(idx[0])]
    for _ in range(19):
        d = torch.cdist(x, x[chosen]).amin(1)
        chosen.append(int(d.argmax()))
    assert idx.tolist() == chosen
    assert greedy_coreset(x, 500).tolist() == list(range(300))   # k >= n keeps everything


def _coreset_inputs():
    g = torch.Generator().manual_seed(5)
    gauss = torch.randn(3000, 40, generator=g)
    clustered = torch.cat([c + 0.1 * torch.randn(500, 24, generator=g) for c in torch.randn(6, 24, generator=g) * 5])
    # exact duplicates, and more picks than distinct rows: ties everywhere, then distances of zero
    dupes = torch.randn(40, 12, generator=g).repeat(30, 1)[torch.randperm(1200, generator=g)]
    return {"gauss": (gauss, 300, 16), "clustered": (clustered, 200, 0), "dupes": (dupes, 64, 0)}


@pytest.mark.parametrize("case", ["gauss", "clustered", "dupes"])
@pytest.mark.parametrize("small_work", [False, True])
def test_greedy_coreset_picks_exactly_what_the_reference_picks(case, small_work, monkeypatch):
    """The fast selection returns the reference's rows in the reference's order, also when its candidate lists,
    pools and refresh intervals are tiny (every widening and rebuild path runs)."""
    import knn
    if small_work:
        for name, value in (("CORESET_CANDIDATES", 1), ("CORESET_POOL", 4), ("CORESET_REFRESH", 3),
                            ("CORESET_ROW_BLOCK", 100)):
            monkeypatch.setattr(knn, name, value)
    x, k, proj = _coreset_inputs()[case]
    want = knn.greedy_coreset_ref(x, k, projection_dim=proj, seed=2)
    assert torch.equal(knn.greedy_coreset(x, k, projection_dim=proj, seed=2), want)


@pytest.mark.slow
def test_greedy_coreset_matches_the_reference_on_real_features(shared_data):
    """Real patch features (EfficientNet-Lite0 stages 3+4 of MulSen-AD capsule train images): same rows."""
    from torch.utils.data import DataLoader
    from datasets import build_dataset
    import knn
    model = PatchKNN(KNNConfig(aux_ch=1))
    ds = build_dataset("mulsenad", str(shared_data / "MulSen_AD_mini"), "capsule", "train", 128, 1)
    batch = next(iter(DataLoader(ds, batch_size=24)))
    with torch.no_grad():
        f = model.patch_features(batch["rgb"], batch["aux"])["aux"]
    rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    assert torch.equal(knn.greedy_coreset(rows, 700), knn.greedy_coreset_ref(rows, 700))


def test_coreset_covers_every_cluster():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 32, generator=g) * 50
    x = torch.cat([c + torch.randn(200, 32, generator=g) for c in centers])
    idx = greedy_coreset(x, 5, projection_dim=16, seed=0)
    assert sorted((idx // 200).tolist()) == [0, 1, 2, 3, 4]


def test_nearest_distance_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    q, bank = torch.randn(1000, 12, generator=g), torch.randn(77, 12, generator=g)
    want = torch.stack([((bank - v) ** 2).sum(1).sqrt().min() for v in q])
    assert torch.allclose(nearest_distance(q, bank, block=128), want, atol=1e-5)
    assert torch.allclose(nearest_distance(q, bank), want, atol=1e-5)


def test_gaussian_blur_keeps_mass_and_constants():
    x = torch.zeros(1, 1, 33, 33)
    x[..., 16, 16] = 1.0
    y = gaussian_blur(x, 2.0)
    assert y.sum() == pytest.approx(1.0, abs=1e-5) and y.max() < 0.1
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 20, 20), 3.0), 4.0), torch.tensor(3.0))


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("knn")
    args = train_script.get_args_parser().parse_args(
        ["--model", "knn", "--dataset", "synthetic", "--object", "disc", "--img_size", "64", "--aux_ch", "3",
         "--coreset_size", "256", "--val_fraction", "0.1", "--quiet", "--out_dir", str(out)])
    res = train_script.main(args)
    return out, res


def test_knn_trains_saves_reloads_and_evaluates(knn_run, tmp_path):
    out, res = knn_run
    ckpt = torch.load(out / "best_checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["model_type"] == "knn" and ckpt["config"]["aux_ch"] == 3
    assert ckpt["model"]["bank_rgb"].shape[0] == 256 and ckpt["model"]["bank_aux"].shape[0] == 256
    model = load_model(ckpt)
    again = load_model(torch.load(out / "best_checkpoint.pth", weights_only=True))
    x, a = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    o1, o2 = model(x, a), again(x, a)
    assert torch.equal(o1["seg_logits"], o2["seg_logits"]) and torch.equal(o1["score_logit"], o2["score_logit"])
    assert o1["seg_logits"].shape == (2, 1, 64, 64) and o1["score"].shape == (2,)
    assert set(o1["per_modality"]) == {"rgb", "aux"}
    summary = eval_script.main(eval_script.get_args_parser().parse_args(
        ["--checkpoint", str(out / "best_checkpoint.pth"), "--out_dir", str(tmp_path / "eval"), "--quiet",
         "--save_vis"]))
    for key in ("image_auroc", "pixel_auroc", "aupro", "aupro_0.05", "aupro_0.01"):
        assert 0.0 <= summary["overall"][key] <= 1.0, key
    # pretrained features see the synthetic defects without any training
    assert summary["overall"]["image_auroc"] > 0.7
    js = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert js["settings"]["model"] == "knn"
    assert (tmp_path / "eval" / "eval_results.csv").is_file()
    assert any((tmp_path / "eval" / "vis" / "heatmaps").iterdir())


def test_knn_standardises_on_held_out_normals(knn_run):
    out, res = knn_run
    from datasets import build_dataset
    splits = json.loads((out / "splits.json").read_text())
    assert splits["holdout"] and not set(splits["holdout"]) & set(splits["bank"])
    model = load_model(torch.load(out / "best_checkpoint.pth", weights_only=True))
    ds = build_dataset("synthetic", None, "disc", "train", 64, 3)
    hold = [i for i, r in enumerate(ds.records) if r.rgb in set(splits["holdout"])]
    batch = torch.utils.data.default_collate([ds[i] for i in hold])
    o = model(batch["rgb"], batch["aux"])
    for m in ("rgb", "aux"):   # held-out normals: standardised image scores have mean 0 and std 1 by definition
        z = o["per_modality"][m]["score"]
        assert abs(float(z.mean())) < 1e-3 and float(z.std()) == pytest.approx(1.0, abs=1e-3)


def test_knn_fitted_with_aux_predicts_from_rgb_alone(knn_run):
    out, _ = knn_run
    model = load_model(torch.load(out / "best_checkpoint.pth", weights_only=True))
    x, a = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    rgb_only = model(x)
    assert set(rgb_only["per_modality"]) == {"rgb"}
    assert torch.allclose(rgb_only["score_logit"], model(x, a)["per_modality"]["rgb"]["score"], atol=1e-5)


def test_unfitted_knn_says_so():
    model = PatchKNN(KNNConfig(aux_ch=0), pretrained=False)
    with pytest.raises(RuntimeError, match="fit it first"):
        model(torch.randn(1, 3, 64, 64))


def test_leave_one_out_scores_of_a_subset_are_those_images_scores():
    """MemoryBank.fit(loo_images=...) scores only those bank images, each exactly as the full leave-one-out pass
    scores it (train.py gives the knn the same <= 64 images MambaAlign's threshold takes)."""
    from knn import MemoryBank
    torch.manual_seed(0)
    feats = torch.randn(40, 8, 4, 4)        # 40 images of 4x4 patches, 8 channels: image i's features are feats[i]
    patch = lambda rgb, aux: {"rgb": feats[rgb[:, 0, 0, 0].long()]}
    batch = lambda idx: {"rgb": torch.tensor(idx, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 16, 16),
                         "index": torch.tensor(idx) + 100}
    bank_batches = [batch(list(range(s, s + 8))) for s in range(0, 32, 8)]
    held = [batch(list(range(32, 40)))]

    def fit(**kw):
        bank = MemoryBank(("rgb",), 8, coreset_size=64, projection_dim=0, sigma=1.0)
        return bank.fit(patch, bank_batches, held, **kw)["normal_scores"]["bank_loo"]

    every = fit()
    some = fit(loo_images=[131, 102, 117, 103])
    assert every.shape == (32,) and some.shape == (4,)
    assert torch.equal(some, every[[2, 3, 17, 31]])          # in bank order
    assert fit(loo_images=()).numel() == 0


def test_knn_threshold_takes_the_calibration_images_of_a_large_bank(knn_run):
    out, _ = knn_run
    splits = json.loads((out / "splits.json").read_text())
    cal = torch.load(out / "best_checkpoint.pth", weights_only=True)["metrics"]["calibration"]
    assert len(splits["bank"]) > train_script.CALIBRATION_IMAGES
    assert cal["normals"] == len(splits["holdout"]) + train_script.CALIBRATION_IMAGES
