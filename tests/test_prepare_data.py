"""prepare_data.py: background removal into a new tree (source untouched) and the Eyecandies conversion."""
import hashlib
import os

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

import prepare_data
from datasets import build_dataset


def _checksums(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _scene(H=40, W=40):
    """A tilted background plane, a sphere-cap object in the middle and a small floating speck."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    x, y = (u - W / 2) * 0.01, (v - H / 2) * 0.01
    z = 1.0 + 0.1 * x - 0.05 * y + np.random.default_rng(0).normal(0, 0.0005, (H, W))
    obj = (u - W / 2) ** 2 + (v - H / 2) ** 2 < 8 ** 2
    z[obj] -= 0.03 + np.sqrt(np.clip(64 - (u - W / 2) ** 2 - (v - H / 2) ** 2, 0, None))[obj] * 0.004
    speck = (slice(3, 5), slice(30, 32))
    z[speck] -= 0.05
    return np.stack([x, y, z], -1).astype(np.float32), obj, speck


def _raw_tree(root):
    xyz, obj, speck = _scene()
    for split, defect in (("train", "good"), ("test", "hole")):
        d = os.path.join(root, "peach", split, defect)
        for sub in ("rgb", "xyz", "gt"):
            os.makedirs(os.path.join(d, sub))
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(os.path.join(d, "rgb", "000.png"))
        tifffile.imwrite(os.path.join(d, "xyz", "000.tiff"), xyz, photometric="minisblack")
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(os.path.join(d, "gt", "000.png"))
    return obj, speck


def test_mvtec3d_background_removal_leaves_source_untouched(tmp_path):
    src, dst = str(tmp_path / "raw"), str(tmp_path / "prep")
    obj, speck = _raw_tree(src)
    before = _checksums(src)
    counts = prepare_data.prepare_mvtec3d(src, dst, workers=1, progress=False)
    assert _checksums(src) == before
    assert counts == {"processed": 2, "copied": 4, "skipped": 0}
    out = tifffile.imread(os.path.join(dst, "peach/train/good/xyz/000.tiff"))
    kept = np.any(out != 0, axis=2)
    assert kept[obj].mean() > 0.95            # the object stays
    assert not kept[~obj].any()               # the plane and the speck are gone
    assert not kept[speck].any()
    assert open(os.path.join(dst, "peach/test/hole/rgb/000.png"), "rb").read() == \
        open(os.path.join(src, "peach/test/hole/rgb/000.png"), "rb").read()
    again = prepare_data.prepare_mvtec3d(src, dst, workers=1, progress=False)
    assert again == {"processed": 0, "copied": 0, "skipped": 6}   # resumable
    ds = build_dataset("mvtec3d", dst, "peach", "train", 32, 3)
    assert ds[0]["valid"].sum() > 0


def test_mvtec3d_refuses_destination_inside_source(tmp_path):
    _raw_tree(str(tmp_path / "raw"))
    with pytest.raises(SystemExit, match="outside --src"):
        prepare_data.prepare_mvtec3d(str(tmp_path / "raw"), str(tmp_path / "raw" / "out"), progress=False)


def test_eyecandies_conversion_loads_as_mvtec3d(tmp_path):
    src = tmp_path / "Eyecandies"
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1), ("test_public", 2)):
        d = src / "CandyCane" / split / "data"
        d.mkdir(parents=True)
        for i in range(n):
            sid = f"{i:03d}"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{sid}_image_0.png")
            Image.fromarray(np.full((32, 32), 30000, np.uint16)).save(d / f"{sid}_depth.png")
            (d / f"{sid}_info_depth.yaml").write_text(yaml.safe_dump({"normalization": {"min": 0.5, "max": 1.5}}))
            m = np.zeros((32, 32), np.uint8)
            if split == "test_public" and i == 1:
                m[5:10, 5:10] = 255
            Image.fromarray(m).save(d / f"{sid}_mask.png")
    before = _checksums(str(src))
    counts = prepare_data.prepare_eyecandies(str(src), str(tmp_path / "out"), progress=False)
    assert counts == {"converted": 5, "skipped": 0} and _checksums(str(src)) == before
    test = build_dataset("eyecandies", str(tmp_path / "out"), "CandyCane", "test", 32, 1)
    assert test.defect_counts() == {"bad": 1, "good": 1}
    z = tifffile.imread(str(tmp_path / "out/CandyCane/train/good/xyz/000.tiff"))[..., 2]
    assert np.allclose(z, 0.5 + 30000 / 65535)
    assert len(build_dataset("eyecandies", str(tmp_path / "out"), "CandyCane", "validation", 32, 3)) == 1


def test_a_bad_file_is_named_at_the_end_and_the_rest_prepared_and_resumed(tmp_path, capsys):
    src, dst = tmp_path / "raw", tmp_path / "prep"
    _raw_tree(str(src))
    bad = src / "peach" / "test" / "hole" / "xyz" / "000.tiff"
    good_copy = bad.read_bytes()
    bad.write_bytes(good_copy[: len(good_copy) // 3])
    from engine import run_cli
    with pytest.raises(SystemExit) as info:
        run_cli(prepare_data.main, prepare_data.get_args_parser(), ["mvtec3d", "--src", str(src), "--dst", str(dst)])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and "Traceback" not in err
    assert str(bad) in err and "1 file(s) could not be prepared" in err
    assert (dst / "peach" / "train" / "good" / "xyz" / "000.tiff").is_file()            # the rest is done
    assert (dst / "peach" / "train" / "good" / "normals" / "000.npz").is_file()
    assert not (dst / "peach" / "test" / "hole" / "xyz" / "000.tiff").exists()
    bad.write_bytes(good_copy)
    counts = prepare_data.prepare_mvtec3d(str(src), str(dst), progress=False)
    assert counts == {"processed": 1, "copied": 0, "skipped": 5}                          # resumed
    assert not [p for p in dst.rglob("*") if ".tmp" in p.name]


def test_a_stale_normals_cache_is_not_used_and_preparing_again_refreshes_it(tmp_path):
    """Normals caches of an earlier rule (v1: no normal on the border or beside missing points) are computed from
    the xyz instead, with a warning; prepare_data.py on the same destination rewrites them, and nothing else."""
    from datasets.mvtec3d import MVTec3D, cache_is_current, cache_path, read_xyz
    from datasets.transforms import normals_from_xyz
    _raw_tree(str(tmp_path / "src"))
    dst = str(tmp_path / "dst")
    prepare_data.prepare_mvtec3d(str(tmp_path / "src"), dst, progress=False)
    xyz_file = os.path.join(dst, "peach", "train", "good", "xyz", "000.tiff")
    cache = cache_path(xyz_file, "normals")
    assert cache_is_current(cache, "normals")
    fresh = np.load(cache)["values"]
    np.savez(cache, values=np.zeros_like(fresh), valid=np.zeros(fresh.shape[:2], bool),
             image_hw=np.asarray(fresh.shape[:2]))                           # the v1 layout: no version field
    assert not cache_is_current(cache, "normals")
    with pytest.warns(UserWarning, match="earlier prepare_data.py"):
        n, valid = MVTec3D.read_aux(xyz_file, 3)
    expected, expected_valid = normals_from_xyz(read_xyz(xyz_file))
    assert np.array_equal(valid, expected_valid) and np.allclose(n, expected, atol=1e-3)
    tiff_before = _checksums(os.path.join(dst, "peach", "train", "good", "xyz"))
    prepare_data.prepare_mvtec3d(str(tmp_path / "src"), dst, progress=False)
    assert cache_is_current(cache, "normals") and np.array_equal(np.load(cache)["values"], fresh)
    assert _checksums(os.path.join(dst, "peach", "train", "good", "xyz")) == tiff_before
