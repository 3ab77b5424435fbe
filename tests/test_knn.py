"""The memory-bank baseline: coreset, nearest-neighbour search, and train.py --model knn -> eval.py."""
import json
import math

import pytest
import torch

import eval as eval_script
import train as train_script
from engine import load_model
import knn
from knn import (BankSearch, KNNConfig, PatchKNN, gaussian_blur, greedy_coreset, nearest_distance,
                 nearest_distance_ref, search_dtype, separable_filter)


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
    # integer points: exact ties between a candidate's distance and other rows' bounds at every stage
    grid = torch.cartesian_prod(torch.arange(12.0), torch.arange(12.0), torch.arange(3.0))
    grid = grid[torch.randperm(len(grid), generator=g)]
    return {"gauss": (gauss, 300, 16), "clustered": (clustered, 200, 0), "dupes": (dupes, 64, 0),
            "grid": (grid, 60, 0)}


@pytest.mark.parametrize("case", ["gauss", "clustered", "dupes", "grid"])
@pytest.mark.parametrize("small_work", [False, True])
def test_greedy_coreset_picks_exactly_what_the_reference_picks(case, small_work, monkeypatch):
    """The fast selection returns the reference's rows in the reference's order, also when its candidate lists,
    pools and refresh intervals are tiny (every widening and rebuild path runs, and runs of picks from one candidate
    list of 2 or 4 rows, never of wider lists)."""
    import knn
    if small_work:
        for name, value in (("CORESET_CANDIDATES", 1), ("CORESET_POOL", 4), ("CORESET_REFRESH", 3),
                            ("CORESET_ROW_BLOCK", 100), ("CORESET_RUN_CANDIDATES", 4)):
            monkeypatch.setattr(knn, name, value)
    x, k, proj = _coreset_inputs()[case]
    want = knn.greedy_coreset_ref(x, k, projection_dim=proj, seed=2)
    assert torch.equal(knn.greedy_coreset(x, k, projection_dim=proj, seed=2), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coreset_refreshes_are_exact_in_either_product_dtype(dtype, monkeypatch):
    """The refreshes' candidate products in float32 and in bfloat16 (forced here; search_dtype picks by CPU) keep
    the reference's rows; the bfloat16 filter without its rounding-error terms loses them on clustered rows, so the
    bounds are what keeps it exact."""
    import knn
    monkeypatch.setattr(knn, "search_dtype", lambda device: dtype)
    for case in ("gauss", "clustered", "dupes", "grid"):
        x, k, proj = _coreset_inputs()[case]
        assert torch.equal(knn.greedy_coreset(x, k, projection_dim=proj, seed=2),
                           knn.greedy_coreset_ref(x, k, projection_dim=proj, seed=2)), case
    if dtype == torch.bfloat16:
        monkeypatch.setattr(knn, "_UBF16", 0.0)       # alpha and out_round without bfloat16's rounding
        x, k, proj = _coreset_inputs()["clustered"]
        assert not torch.equal(knn.greedy_coreset(x, k, projection_dim=proj, seed=2),
                               knn.greedy_coreset_ref(x, k, projection_dim=proj, seed=2))


def test_pairs_at_most_lists_every_pair_within_the_bound():
    """BankSearch.pairs_at_most (the coreset refresh's filter): a superset of the pairs whose difference-formula
    value is at most the bound, few beyond them, and every pair of a row with a NaN."""
    g = torch.Generator().manual_seed(8)
    q, bank = torch.randn(400, 24, generator=g) + 3, torch.randn(64, 24, generator=g) + 3
    exact = ((q[:, None] - bank[None]) ** 2).sum(-1)
    bound = exact.min(1).values * torch.rand(400, generator=g) * 1.5
    q[5, 2] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        search = BankSearch(bank, dtype, mu=q[6:].mean(0))
        rows, cols = search.pairs_at_most(*search.query_side(q), bound)
        got = torch.zeros(400, 64, dtype=torch.bool)
        got[rows, cols] = True
        want = exact <= bound[:, None]
        assert got[want].all() and got[5].all(), dtype
        assert got.sum() <= want.sum() + 64 + (want.sum() // 4 if dtype == torch.bfloat16 else 2), dtype


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


def _search_cases():
    """(name, queries, bank): data on which a loose product picks the wrong row or a too tight bound misses the
    nearest one."""
    g = torch.Generator().manual_seed(2)
    yield "gaussian", torch.randn(1000, 12, generator=g), torch.randn(77, 12, generator=g)
    # a large common offset (norms ~ 300) and near ties: many bank rows at almost the same distance from each query,
    # 1e-4 apart, far below a bfloat16 product's resolution there
    q = torch.randn(40, 152, generator=g) + 25
    dirs = torch.nn.functional.normalize(torch.randn(40, 50, 152, generator=g), dim=-1)
    radii = 3 + 1e-4 * torch.randperm(50, generator=g).float()
    yield "near ties", q, (q[:, None] + radii[None, :, None] * dirs).reshape(-1, 152)
    # exact duplicates of query rows (distance 0), repeated bank rows, a bank size that is not a multiple of 8
    b = torch.randn(203, 33, generator=g).abs() * 10
    yield "duplicates", torch.cat([b[:50], torch.randn(300, 33, generator=g).abs() * 10]), torch.cat([b, b[:20]])
    # rows one float32 step apart
    b = torch.randn(64, 16, generator=g) * 40
    yield "float32 steps", b + 0.5, torch.cat([b, torch.nextafter(b, torch.full_like(b, math.inf))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["gaussian", "near ties", "duplicates", "float32 steps"])
def test_nearest_distance_is_the_brute_force_minimum_bit_for_bit(case, dtype):
    q, bank = next((qq, bb) for name, qq, bb in _search_cases() if name == case)
    want = nearest_distance_ref(q, bank)
    assert torch.equal(want, torch.stack([((bank - v) ** 2).sum(1).min() for v in q]).sqrt())
    for block in (None, 7, 128):
        assert torch.equal(nearest_distance(q, bank, block=block, dtype=dtype), want), (case, dtype, block)
    # a strided query (as a permuted feature map is) gives the same bits
    assert torch.equal(nearest_distance(q.T.contiguous().T, bank, dtype=dtype), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_search_skips_rows_and_leaves_non_finite_queries_to_the_plain_way(dtype):
    g = torch.Generator().manual_seed(3)
    q, bank = torch.randn(300, 20, generator=g) + 5, torch.randn(500, 20, generator=g) + 5
    search = BankSearch(bank, dtype)
    skip = torch.rand(500, generator=g) < 0.3
    assert torch.equal(search(q, skip=skip), nearest_distance_ref(q, bank[~skip]))
    with pytest.raises(ValueError, match="empty"):
        search(q, skip=torch.ones(500, dtype=torch.bool))
    bad = q.clone()
    bad[3, 4], bad[7, 0] = float("nan"), float("inf")
    got, want = search(bad), nearest_distance_ref(bad, bank)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()])
    assert got[3].isnan() and got[7].isinf()


def test_search_bounds_leave_few_candidates_and_catch_a_too_tight_bound(monkeypatch):
    """The bounds are what make the search exact: zeroing the bfloat16 error term must make it miss nearest rows
    on the near ties (so the exactness test above can fail), and the proper bound keeps few candidates on data
    without ties."""
    _, q, bank = list(_search_cases())[1]
    search = BankSearch(bank, torch.bfloat16)
    monkeypatch.setattr(search, "alpha", 0.0)
    monkeypatch.setattr(search, "out_round", 0.0)
    assert not torch.equal(search(q), nearest_distance_ref(q, bank))
    g = torch.Generator().manual_seed(4)
    q, bank = torch.randn(500, 64, generator=g), torch.randn(2000, 64, generator=g)
    for dtype, most in ((torch.bfloat16, 40), (torch.float32, 2)):
        search = BankSearch(bank, dtype)
        rows, _, plain = search._candidates(*search.query_side(q), search._columns(None))
        per_query = torch.bincount(rows, minlength=500)
        assert not plain.any() and per_query.min() >= 1 and per_query.float().mean() <= most, dtype


def test_split3_and_true_positions_are_exact():
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(1000, generator=g) * 10 ** torch.randint(-25, 25, (1000,), generator=g).float(),
                   torch.tensor([0.0, 1.0, 3.3e38, 2.0 ** -100, 123456.789])])
    hi, mid, lo = knn._split3(x)
    assert torch.equal(hi.double() + mid.double() + lo.double(), x.double())
    mask = torch.rand(37, 64, generator=g) < 0.05
    rows, cols = knn._true_positions(mask)
    want = mask.nonzero(as_tuple=True)
    assert torch.equal(rows, want[0]) and torch.equal(cols, want[1])


def test_positions_at_most_are_the_element_wise_comparisons_pairs():
    """The search's candidates through chunk minima: the same (row, column) pairs as comparing every element, for
    int16 views of bfloat16 products (negative values included) and float32, bank widths that are multiples of the
    chunk, not, and narrower than one, a row with no entry below its threshold and one with every entry."""
    g = torch.Generator().manual_seed(11)
    for n in (256, 300, 40, 64):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(50, n, generator=g)
            x[0] = x[0].abs() + 1
            thr = torch.quantile(x, 0.03, dim=1)
            thr[0], thr[1] = 0.5, 100.0
            x, thr = x.to(dtype), thr.to(dtype)
            if dtype == torch.bfloat16:      # compared as 16-bit integers, as the search does (thresholds >= 0)
                x, thr = x.view(torch.int16), thr.clamp_min(0).view(torch.int16)
            rows, cols = knn._positions_at_most(x, thr, width=32)
            key = (rows * n + cols).sort().values
            want = (x <= thr[:, None]).nonzero(as_tuple=True)
            assert torch.equal(key, want[0] * n + want[1]), (n, dtype)
            assert not (rows == 0).any() and (rows == 1).sum() == n


def test_search_dtype_is_bfloat16_only_on_cpus_with_bfloat16_units(monkeypatch):
    monkeypatch.setattr(knn, "_cpu_has_bf16_units", lambda: True)
    assert search_dtype("cpu") == torch.bfloat16 and search_dtype(torch.device("cpu")) == torch.bfloat16
    assert search_dtype("cuda") == torch.float32
    monkeypatch.setattr(knn, "_cpu_has_bf16_units", lambda: False)
    assert search_dtype("cpu") == torch.float32


def test_gaussian_blur_keeps_mass_and_constants():
    x = torch.zeros(1, 1, 33, 33)
    x[..., 16, 16] = 1.0
    y = gaussian_blur(x, 2.0)
    assert y.sum() == pytest.approx(1.0, abs=1e-5) and y.max() < 0.1
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 20, 20), 3.0), 4.0), torch.tensor(3.0))


def _filter_ref(x: torch.Tensor, k: torch.Tensor, mode: str) -> torch.Tensor:
    """Each map filtered in float64 from the definition: the 1-D kernel k along W, then along H, with reflected
    or clamped (replicate) indices at the borders."""
    H, W = x.shape[-2:]
    r = (k.numel() - 1) // 2
    k = k.double()

    def index(n):
        i = torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None]                  # (n, taps)
        if mode == "replicate":
            return i.clamp(0, n - 1)
        return torch.where(i < 0, -i, torch.where(i >= n, 2 * (n - 1) - i, i))
    y = (x.double()[..., index(W)] * k).sum(-1)                                        # along W
    return (y[..., index(H), :] * k[:, None]).sum(-2)                                 # along H


@pytest.mark.parametrize("shape,sigma", [((1, 1, 40, 56), 4.0), ((17, 1, 32, 32), 2.0), ((3, 2, 24, 20), 1.5),
                                         ((2, 1, 7, 5), 4.0)])
def test_gaussian_blur_is_the_definition_per_map(shape, sigma):
    """Every map of a batch blurred on its own (the maps are the channels of one depthwise convolution): the
    float64 definition to float32 rounding, with the radius 4 sigma clipped to small maps; strided inputs as
    contiguous ones; an empty batch stays empty."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g) * 50
    y = gaussian_blur(x, sigma)
    r = min(math.ceil(4 * sigma), shape[-1] - 1, shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(y.double(), _filter_ref(x, k / k.sum(), "reflect"), rtol=1e-6, atol=1e-5)
    strided = torch.rand((shape[0], shape[1], shape[3], shape[2]), generator=g).transpose(-1, -2)
    assert torch.equal(gaussian_blur(strided, sigma), gaussian_blur(strided.contiguous(), sigma))
    assert gaussian_blur(x[:0], sigma).shape == (0,) + shape[1:]


def test_separable_filter_replicate_and_odd_kernels():
    """The padding mode global alignment's edge strength uses (replicate), an asymmetric kernel (so W and H
    must each get it the right way round), several channels per image."""
    x = torch.rand((2, 3, 19, 23), generator=torch.Generator().manual_seed(1)) * 10
    k = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05])
    for mode in ("replicate", "reflect"):
        y = separable_filter(x, k, mode)
        assert torch.allclose(y.double(), _filter_ref(x, k, mode), rtol=1e-6, atol=1e-5), mode


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
