"""Training-anomaly synthesis and the procedural synthetic dataset."""

import numpy as np
import pytest
from scipy import ndimage
import torch
from PIL import Image

from datasets import DatasetError, build_dataset
from datasets.synthesis import (AnomalySynthesizer, SynthesisDataset, TextureSource, _geometry, _procedural_texture,
                                contact_sheet, misalign, synthesize)
from datasets.synthetic import (DEFECT_TYPES, OBJECT_TYPES, SyntheticDataset, render_sample,
                                write_mvtec3d_tree)


@pytest.fixture(scope="module")
def sample():
    return SyntheticDataset(None, "disc", "train", 64, aux_ch=3)[0]


def _run(sample, mode, seed, kind="normals", **kw):
    return synthesize(sample["rgb"], sample["aux"], np.random.default_rng(seed), aux_kind=kind, mode=mode, **kw)


def test_same_seed_same_output_different_seed_different(sample):
    a = _run(sample, "both", 3)
    b = _run(sample, "both", 3)
    c = _run(sample, "both", 4)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert not torch.equal(a[2], c[2])


@pytest.mark.parametrize("mode", ["rgb", "aux", "both", "mixed"])
def test_masks_binary_and_non_empty(sample, mode):
    for seed in range(5):
        rgb, aux, mask, used = _run(sample, mode, seed)
        assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
        assert used in ("rgb", "aux", "both")


def test_rgb_mode_leaves_aux_and_aux_mode_leaves_rgb(sample):
    rgb, aux, mask, _ = _run(sample, "rgb", 0)
    assert torch.equal(aux, sample["aux"]) and not torch.equal(rgb, sample["rgb"])
    rgb, aux, mask, _ = _run(sample, "aux", 0)
    assert torch.equal(rgb, sample["rgb"]) and not torch.equal(aux, sample["aux"])


@pytest.mark.parametrize("geometry", ["dome", "plateau"])
def test_normal_anomalies_stay_inside_dilated_mask_and_unit_length(sample, geometry):
    for seed in range(4):
        _, aux, mask, _ = _run(sample, "aux", seed, geometry=geometry)
        changed = (aux - sample["aux"]).abs().amax(0) > 1e-5
        # The height field is the mask blurred with at most 2 px (support 4 sigma) plus one pixel of gradient.
        dilated = ndimage.binary_dilation(mask[0].numpy() > 0, structure=np.ones((3, 3)), iterations=9)
        assert changed.any() and not (changed.numpy() & ~dilated).any()
        assert torch.allclose(aux.norm(dim=0), torch.ones(64, 64), atol=1e-5)


def _flat_normals_anomalies(geometry, seeds=range(8), size=128):
    flat = torch.zeros(3, size, size)
    flat[2] = -1.0
    for seed in seeds:
        _, aux, mask, _ = synthesize(torch.zeros(3, size, size), flat, np.random.default_rng(seed), aux_kind="normals",
                                     mode="aux", restrict_to_foreground=False, geometry=geometry)
        yield mask[0] > 0, torch.rad2deg(torch.arccos((aux * flat).sum(0).clamp(-1, 1)))


def test_dome_anomalies_show_over_the_whole_mask():
    """A dome tilts (almost) every masked pixel's normal, so the label matches what the modality shows, also for
    wide masks."""
    fractions = [float((turn[m] > 5).float().mean()) for m, turn in _flat_normals_anomalies("dome")]
    assert np.mean(fractions) > 0.85 and min(fractions) > 0.7, fractions


def test_plateau_anomalies_label_every_clearly_tilted_pixel():
    for m, turn in _flat_normals_anomalies("plateau"):
        tilted = turn > 10
        assert tilted.any() and float(m[tilted].float().mean()) > 0.999


def test_plateau_labels_its_displaced_flat_top():
    """A wide plateau is a tilted rim around a flat, displaced top. The label holds the top, which keeps its
    normals and shows only through the rim around it, and the foot of the rim just outside the mask."""
    yy, xx = np.mgrid[0:128, 0:128]
    disc = (yy - 64) ** 2 + (xx - 64) ** 2 < 20 ** 2
    h, label = _geometry(disc, np.random.default_rng(0), "plateau", dome_sigma=1.0)
    gy, gx = np.gradient(h)
    top = (yy - 64) ** 2 + (xx - 64) ** 2 < 10 ** 2
    assert np.hypot(gx, gy)[top].max() < 0.01 and h[top].min() > 0.99      # flat and displaced
    assert label[disc].all() and label.sum() > disc.sum()
    assert label.sum() < ndimage.binary_dilation(disc, iterations=8).sum()


def test_geometry_shape_is_validated(sample):
    with pytest.raises(ValueError, match="geometry"):
        _run(sample, "aux", 0, geometry="cube")


def test_depth_and_intensity_anomalies(sample):
    depth = SyntheticDataset(None, "disc", "train", 64, aux_ch=1)[0]
    _, aux, mask, _ = synthesize(depth["rgb"], depth["aux"], np.random.default_rng(0), aux_kind="depth", mode="aux")
    assert (aux - depth["aux"]).abs().max() > 0.5
    for seed in range(3):   # a depth plateau is labelled wherever it moved by more than a tenth of its height
        _, aux, mask, _ = synthesize(depth["rgb"], depth["aux"], np.random.default_rng(seed), aux_kind="depth",
                                     mode="aux", geometry="plateau")
        moved = (aux - depth["aux"]).abs()[0]
        assert mask[0][moved > 0.11 * moved.max()].min() == 1
    ir = torch.zeros(1, 64, 64)
    _, aux, mask, _ = synthesize(depth["rgb"], ir, np.random.default_rng(1), aux_kind="intensity", mode="aux")
    assert aux[mask.bool()].abs().mean() > 0.3


def test_textures_from_folder(sample, tmp_path):
    for i, col in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.fromarray(np.full((20, 30, 3), col, np.uint8)).save(tmp_path / f"t{i}.jpg")
    src = TextureSource(str(tmp_path))
    rgb, _, mask, _ = _run(sample, "rgb", 0, texture_source=src, blend_range=(1.0, 1.0))
    from datasets.transforms import denormalize_rgb
    inside = denormalize_rgb(rgb)[:, mask[0] > 0]
    # Fully opaque blend of a pure red or green image: the anomalous pixels are that colour.
    assert ((inside[0] > 0.95) & (inside[2] < 0.05)).all() or ((inside[1] > 0.95) & (inside[2] < 0.05)).all()
    with pytest.raises(DatasetError, match="not found"):
        TextureSource(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no images"):
        TextureSource(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image"):
        TextureSource(str(tmp_path / "bad")).sample(np.random.default_rng(0), (8, 8))


def test_procedural_discolouration_keeps_shading():
    """One procedural kind is the image itself times a per-channel gain, all darker or all brighter: a stain
    that keeps the part's shading and texture. The others (noise, flat colour, shifted copy) are not."""
    rgb01 = torch.from_numpy(np.random.default_rng(0).uniform(0.2, 0.4, (3, 24, 24))).float()
    found = 0
    for seed in range(40):
        tex = _procedural_texture(rgb01, np.random.default_rng(seed))
        ratio = tex / rgb01
        gain = ratio.mean(dim=(1, 2), keepdim=True)
        if torch.allclose(ratio, gain.expand_as(ratio), atol=1e-5):
            found += 1
            assert (gain < 1).all() or (gain > 1).all()
            assert (gain - 1).abs().min() > 0.04
    assert 4 <= found <= 20  # about a quarter of 40


def test_misalignment_moves_aux_by_the_requested_amount():
    aux = torch.zeros(1, 32, 32)
    aux[0, 10, 10] = 1.0
    out = misalign(aux, None, 0.0, shift=(3.0, -2.0))
    assert out[0, 8, 13] == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)
    n = torch.zeros(3, 16, 16)
    n[0], n[2] = 0.6, -0.8
    rot = misalign(n, np.random.default_rng(0), 0.0, max_deg=10.0, aux_kind="normals")
    assert torch.allclose(rot.norm(dim=0), torch.ones(16, 16), atol=1e-5) and rot[1].abs().max() > 0.01


def test_synthesizer_prob_and_mask_follows_rgb(sample):
    syn = AnomalySynthesizer("normals", "mixed", synth_prob=0.0, misalign_px=2.0)
    out = syn(sample, np.random.default_rng(0))
    assert out["label"] == 0 and out["mask"].sum() == 0 and not torch.equal(out["aux"], sample["aux"])
    assert torch.equal(out["rgb"], sample["rgb"])
    syn = AnomalySynthesizer("normals", "rgb", synth_prob=1.0)
    out = syn(sample, np.random.default_rng(0))
    assert out["label"] == 1 and out["mask"].sum() > 0
    with pytest.raises(ValueError, match="synth_prob"):
        AnomalySynthesizer("normals", synth_prob=1.5)


def test_fixed_synthesis_dataset_pairs_and_repeats():
    """Validation: each image twice, with its fixed anomaly and clean; the same every epoch."""
    base = SyntheticDataset(None, "ring", "train", 32, aux_ch=3)
    ds = SynthesisDataset(base, AnomalySynthesizer("normals", "mixed", 1.0), seed=5, fixed=True, indices=[0, 1, 2, 3])
    assert len(ds) == 8
    items = [ds[i] for i in range(8)]
    assert [s["label"] for s in items] == [1, 0] * 4
    for k in range(4):  # the clean view is the image itself; the anomalous one is that image, changed
        clean, anomalous = items[2 * k + 1], items[2 * k]
        assert torch.equal(clean["rgb"], base[k]["rgb"]) and torch.equal(clean["aux"], base[k]["aux"])
        assert clean["mask"].sum() == 0 and anomalous["mask"].sum() > 0
        outside = anomalous["mask"][0] == 0
        assert torch.allclose(anomalous["rgb"][:, outside], clean["rgb"][:, outside], atol=1e-5)
        assert not (torch.equal(anomalous["rgb"], clean["rgb"]) and torch.equal(anomalous["aux"], clean["aux"]))
    ds.set_epoch(3)
    assert torch.equal(ds[0]["mask"], SynthesisDataset(base, ds.synth, seed=5, fixed=True, indices=[0])[0]["mask"])


def test_synthetic_dataset_deterministic_and_defect_kinds():
    a = SyntheticDataset(None, "tile", "test", 64, aux_ch=3, seed=1)
    b = SyntheticDataset(None, "tile", "test", 64, aux_ch=3, seed=1)
    c = SyntheticDataset(None, "tile", "test", 64, aux_ch=3, seed=2)
    assert torch.equal(a[20]["rgb"], b[20]["rgb"]) and not torch.equal(a[20]["rgb"], c[20]["rgb"])
    assert a.defect_counts() == {"good": 16, "pit": 16, "scratch": 16, "hairline": 16, "specular": 16}
    for i, r in enumerate(a.records):
        s = a[i]
        assert (s["mask"].sum() > 0) == (r.label == 1)
    assert build_dataset("synthetic", None, "ring", "train", 32, 1)[0]["aux"].shape == (1, 32, 32)


def _angle(n1, n2):
    return np.degrees(np.arccos(np.clip((n1 * n2).sum(-1), -1, 1)))


@pytest.mark.parametrize("obj", OBJECT_TYPES)
def test_each_defect_shows_in_the_modalities_it_claims(obj):
    for seed in range(3):
        clean = render_sample(np.random.default_rng(seed), 96, obj, "good")
        for defect in DEFECT_TYPES:
            s = render_sample(np.random.default_rng(seed), 96, obj, defect)
            m = s["mask"]
            assert m.any(), (defect, seed)
            rgb_changed = np.abs(s["rgb"].astype(int) - clean["rgb"].astype(int)).max() > 10
            geo_changed = _angle(s["normals"], clean["normals"]).max() > 10
            assert (rgb_changed, geo_changed) == {"pit": (False, True), "scratch": (True, True),
                                                  "hairline": (True, False), "specular": (True, False)}[defect]
            moved = np.abs(s["depth"] - clean["depth"])
            assert (moved[~m] <= 1e-3).all()            # every pixel that moved is in the mask
            changed = np.abs(s["rgb"].astype(int) - s["rgb_clean"].astype(int)).max(-1) > 1
            if defect in ("hairline", "specular"):
                assert not changed[~m].any()            # every pixel whose colour changed is in the mask


def test_test_defects_come_from_families_the_training_synthesis_never_draws():
    """Geometry: test pits and scratches have walls steeper than any training bump (whose steepest slope is at
    most NORMAL_BUMP_SLOPE[1]). Colour: training masks cover at least MIN_MASK_FRACTION of the image and survive
    one 3x3 erosion (Perlin cells of >= 8 px); a hairline vanishes under that erosion and a specular spot is
    smaller than that fraction."""
    from datasets.synthesis import MIN_MASK_FRACTION, NORMAL_BUMP_SLOPE, perlin_mask
    max_train_tilt = np.degrees(np.arctan(NORMAL_BUMP_SLOPE[1]))
    flat = torch.zeros(3, 96, 96)
    flat[2] = -1.0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        _, aux, mask, _ = synthesize(torch.zeros(3, 96, 96), flat.clone(), rng, aux_kind="normals", mode="aux",
                                     restrict_to_foreground=False)
        tilt = _angle(aux.permute(1, 2, 0).numpy(), flat.permute(1, 2, 0).numpy())
        assert tilt.max() <= max_train_tilt + 1.0
        m = perlin_mask((96, 96), rng)
        assert m.mean() >= MIN_MASK_FRACTION and ndimage.binary_erosion(m, np.ones((3, 3))).any()
    for obj in OBJECT_TYPES:
        for seed in range(4):
            clean = render_sample(np.random.default_rng(seed), 96, obj, "good")
            for defect in ("pit", "scratch"):
                s = render_sample(np.random.default_rng(seed), 96, obj, defect)
                assert _angle(s["normals"], clean["normals"])[s["mask"]].max() > max_train_tilt + 10, (obj, defect)
            hair = render_sample(np.random.default_rng(seed), 96, obj, "hairline")["mask"]
            assert hair.any() and not ndimage.binary_erosion(hair, np.ones((3, 3))).any()
            spot = render_sample(np.random.default_rng(seed), 96, obj, "specular")["mask"]
            assert 0 < spot.mean() < MIN_MASK_FRACTION


def test_written_tree_loads_through_mvtec3d_loader(tmp_path):
    counts = {"train": 2, "test_good": 1, "test_defect": 1}
    write_mvtec3d_tree(str(tmp_path), "disc", 64, seed=0, counts=counts)
    train = build_dataset("mvtec3d", str(tmp_path), "disc", "train", 64, 3)
    test = build_dataset("mvtec3d", str(tmp_path), "disc", "test", 64, 3)
    assert len(train) == 2 and test.defect_counts() == {"good": 1, "hairline": 1, "pit": 1, "scratch": 1,
                                                         "specular": 1}
    s = test[[r.defect for r in test.records].index("pit")]
    ref = SyntheticDataset(None, "disc", "test", 64, aux_ch=3, counts=counts)
    r = ref[[x.defect for x in ref.records].index("pit")]
    assert torch.equal(s["mask"], r["mask"]) and torch.allclose(s["rgb"], r["rgb"], atol=1e-6)
    v = s["valid"][0] > 0
    cos = (s["aux"] * r["aux"]).sum(0)[v]
    assert cos.mean() > 0.95  # normals from the written xyz agree with the renderer's


def test_contact_sheet(tmp_path):
    path = contact_sheet(str(tmp_path / "sheet.png"), size=32, per_mode=2)
    img = Image.open(path)
    assert img.size[0] == 2 * (3 * 32 + 4) and img.size[1] == 4 * (32 + 18)
    assert np.asarray(img).std() > 10


def test_anomalies_stay_on_a_small_object():
    """A part covering ~3% of a dark image (like MulSen-AD's button cell): anomalies must land on it, not on the
    background (found on the real data: with a 5% floor the estimate was dropped and maps came out inverted)."""
    from datasets.transforms import normalize_rgb
    img = torch.zeros(3, 128, 128)
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    part = (yy - 64) ** 2 + (xx - 64) ** 2 < 12 ** 2
    img[:, part] = 0.7
    for seed in range(5):
        _, _, mask, _ = synthesize(normalize_rgb(img), None, np.random.default_rng(seed), aux_kind=None, mode="rgb")
        assert mask.sum() > 0 and not (mask[0].bool() & ~part).any()


@pytest.mark.parametrize("shape, res", [((256, 256), (4, 8)), ((96, 128), (16, 2)), ((33, 17), (1, 1))])
def test_perlin_noise_is_the_lattice_interpolation_pixel_by_pixel(shape, res):
    """perlin_noise gathers each pixel's corner gradients in two steps (rows, then columns); the noise must be the
    textbook one bit for bit: per pixel, the dot products of its four corner gradients with its offsets,
    blended by the quintic fade (a per-pixel loop on a few pixels, with the same random gradients)."""
    import math
    from datasets.synthesis import perlin_noise
    noise = perlin_noise(shape, res, np.random.default_rng(7))
    (H, W), (ry, rx) = shape, res
    angles = np.random.default_rng(7).uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    y, x = np.linspace(0, ry, H, endpoint=False), np.linspace(0, rx, W, endpoint=False)
    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
    for i, j in [(0, 0), (H - 1, W - 1), (H // 2, W // 3), (H // 3 + 1, W - 2), (1, W // 2)]:
        yi, xi = int(np.floor(y[i])), int(np.floor(x[j]))
        fy, fx = y[i] - yi, x[j] - xi
        dot = lambda dy, dx: (np.cos(angles[yi + dy, xi + dx]) * (fy - dy) + np.sin(angles[yi + dy, xi + dx]) * (fx - dx))
        u, v = fade(fy), fade(fx)
        n0 = dot(0, 0) * (1 - v) + dot(0, 1) * v
        n1 = dot(1, 0) * (1 - v) + dot(1, 1) * v
        assert noise[i, j] == (n0 * (1 - u) + n1 * u) * math.sqrt(2), (i, j)
