"""Dataset loaders on the real samples in ../shared/data and on small trees the tests write for every other
format: counts, shapes, dtypes, masks, labels, normals, valid maps and the errors for bad input."""
import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from datasets import DatasetError, build_dataset, list_objects
from datasets.transforms import AlignedTransform, normals_from_xyz


# ---------------------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------------------

def test_mulsenad_real_tree(shared_data):
    root = str(shared_data / "MulSen_AD_mini")
    assert list_objects("mulsenad", root) == ["button_cell", "capsule"]
    train = build_dataset("mulsenad", root, "capsule", "train", 64, 1)
    assert len(train) == 64 and train.defect_counts() == {"good": 64}
    test = build_dataset("mulsenad", root, "capsule", "test", 96, 1)
    assert test.defect_counts() == {"broken_inside": 8, "broken_outside": 9, "color": 7, "crack": 8, "good": 10,
                                    "hole": 8, "squeeze": 8}
    labels = [r.label for r in test.records]
    assert labels == [int(r.defect != "good") for r in test.records]
    # broken_inside has masks for only 2 of its 8 images: the rest load with empty masks, label kept.
    no_mask = [i for i, r in enumerate(test.records) if r.defect == "broken_inside" and r.mask is None]
    assert len(no_mask) == 6
    s = test[no_mask[0]]
    assert s["label"] == 1 and s["mask"].sum() == 0
    s = test[[i for i, r in enumerate(test.records) if r.defect == "crack"][0]]
    assert s["rgb"].shape == (3, 96, 96) and s["aux"].shape == (1, 96, 96) and s["mask"].shape == (1, 96, 96)
    assert s["rgb"].dtype == torch.float32 and set(s["mask"].unique().tolist()) == {0.0, 1.0}
    assert "valid" not in s and s["object"] == "capsule" and s["path"].endswith("crack/0.png")
    rgb_only = build_dataset("mulsenad", root, "button_cell", "test", 64, 0)
    assert "aux" not in rgb_only[0]


def test_mulsenad_labels_from_csv(tmp_path, shared_data):
    src = shared_data / "MulSen_AD_mini" / "capsule"
    root = tmp_path / "MulSen_AD"
    obj = root / "capsule"
    for sub in ("RGB/train", "Infrared/train", "RGB/test/good", "Infrared/test/good", "RGB/test/hole",
                "Infrared/test/hole", "RGB/GT/hole"):
        (obj / sub).mkdir(parents=True)
    for sub in ("train", "test/good", "test/hole"):
        for name in ("0.png", "1.png"):
            for mod in ("RGB", "Infrared"):
                (obj / mod / sub / name).write_bytes((src / mod / sub / name).read_bytes())
    # Official format: object, RGB, Infrared, Pointcloud. Sample 1's defect shows only in the point cloud.
    (obj / "RGB/GT/hole/data.csv").write_text("object,rgb,infrared,pointcloud\n0,1,1,1\n1,0,0,1\n")
    ds = build_dataset("mulsenad", str(root), "capsule", "test", 32, 1)
    assert {(r.defect, os.path.basename(r.rgb), r.label) for r in ds.records} >= {("hole", "0.png", 1),
                                                                                 ("hole", "1.png", 1)}
    ds_rgb = build_dataset("mulsenad", str(root), "capsule", "test", 32, 1, label_source="rgb")
    assert [r.label for r in ds_rgb.records if r.defect == "hole"] == [1, 0]


def test_mvtec_real_tree(shared_data):
    root = str(shared_data / "hazelnut_toy")
    train = build_dataset("mvtec", root, "hazelnut", "train", 64, 0)
    test = build_dataset("mvtec", root, "hazelnut", "test", 64, 0)
    assert len(train) == 28 and test.defect_counts() == {"colour": 17, "good": 6}
    s = test[[r.defect for r in test.records].index("colour")]
    assert s["mask"].sum() > 0 and "aux" not in s and s["label"] == 1
    with pytest.raises(DatasetError, match="RGB only"):
        build_dataset("mvtec", root, "hazelnut", "train", 64, 1)


# ---------------------------------------------------------------------------------------------------------
# Generated trees
# ---------------------------------------------------------------------------------------------------------

def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _tilted_plane(H=24, W=32, a=0.2, b=-0.1, c=50.0, f=40.0):
    """Organised xyz of the plane z = a x + b y + c seen by a pinhole camera; its normal is known."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    rx, ry = (u - W / 2) / f, (v - H / 2) / f
    z = c / (1 - a * rx - b * ry)
    xyz = np.stack([rx * z, ry * z, z], -1).astype(np.float32)
    n = np.array([a, b, -1.0])
    return xyz, n / np.linalg.norm(n)


def _sphere_cap(H=32, W=32, R=10.0, cz=30.0):
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    x, y = (u - W / 2) * 0.4, (v - H / 2) * 0.4
    inside = x ** 2 + y ** 2 < (R * 0.9) ** 2
    z = np.where(inside, cz - np.sqrt(np.clip(R ** 2 - x ** 2 - y ** 2, 0, None)), 0)
    xyz = np.stack([x * inside, y * inside, z], -1).astype(np.float32)
    return xyz, inside


def _mvtec3d_tree(root, obj="widget", H=24, W=32, missing=None):
    xyz, _ = _tilted_plane(H, W)
    if missing is not None:
        xyz = xyz.copy()
        xyz[missing] = 0
    rng = np.random.default_rng(0)
    for split, defect, n in (("train", "good", 3), ("validation", "good", 2), ("test", "good", 2),
                             ("test", "crack", 2)):
        for i in range(n):
            d = os.path.join(root, obj, split, defect)
            _png(f"{d}/rgb/{i:03d}.png", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
            os.makedirs(f"{d}/xyz", exist_ok=True)
            tifffile.imwrite(f"{d}/xyz/{i:03d}.tiff", xyz, photometric="minisblack")
            if split == "test":
                m = np.zeros((H, W), np.uint8)
                if defect != "good":
                    m[5:10, 5:12] = 255
                _png(f"{d}/gt/{i:03d}.png", m)
    return os.path.join(root, obj)


def test_normals_of_known_surfaces():
    xyz, n_true = _tilted_plane()
    n, valid = normals_from_xyz(xyz)
    assert valid.all()                                    # the border too: one-sided differences there
    assert np.abs(n[valid] - n_true).max() < 1e-4
    holed = xyz.copy()
    holed[5, 6] = 0                                       # a missing point: its neighbours keep their normals
    n, valid = normals_from_xyz(holed)
    assert not valid[5, 6] and valid.sum() == valid.size - 1 and np.abs(n[valid] - n_true).max() < 1e-4
    xyz, inside = _sphere_cap()
    n, valid = normals_from_xyz(xyz)
    center = np.array([0, 0, 30.0])
    expected = xyz - center
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    assert np.abs(n[valid] - expected[valid]).max() < 0.05
    assert (n[valid][:, 2] < 0).all()  # towards the camera
    assert not valid[~inside].any()


@pytest.mark.parametrize("img_size", [32, (48, 64)])
def test_mvtec3d_tree_normals_depth_valid(tmp_path, img_size):
    missing = np.zeros((24, 32), bool)
    missing[:, :8] = True   # a missing block: valid must be False there
    _mvtec3d_tree(str(tmp_path), missing=missing)
    root = str(tmp_path)
    assert list_objects("mvtec3d", root) == ["widget"]
    assert len(build_dataset("mvtec3d", root, "widget", "validation", img_size, 3)) == 2
    test = build_dataset("mvtec3d", root, "widget", "test", img_size, 3)
    assert test.defect_counts() == {"crack": 2, "good": 2}
    s = test[0]  # records are sorted by defect: crack first
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert s["aux"].shape == (3, H, W) and s["valid"].shape == (1, H, W) and s["label"] == 1
    norms = s["aux"].norm(dim=0)[s["valid"][0] > 0]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    _, n_true = _tilted_plane()
    inner = s["valid"][0] > 0
    assert torch.allclose(s["aux"][:, inner].mean(1), torch.tensor(n_true, dtype=torch.float32), atol=1e-3)
    # valid is False exactly where points are missing (the block), True everywhere else, border included.
    raw = test.load_raw(3)[3]
    assert not raw[:, :8].any() and raw[:, 8:].all()
    depth = build_dataset("mvtec3d", root, "widget", "test", img_size, 1)[0]
    assert depth["aux"].shape == (1, H, W)
    v = depth["valid"][0] > 0
    assert abs(depth["aux"][0][v].mean().item()) < 1e-4 and (depth["aux"][0][~v] == 0).all()


def test_flip_keeps_normals_consistent():
    n = np.zeros((8, 8, 3), np.float32)
    n[..., 0], n[..., 2] = 0.6, -0.8
    t = AlignedTransform(8, "normals", hflip=1.0, vflip=1.0)
    out = t(np.zeros((8, 8, 3), np.uint8), n, None, np.ones((8, 8), bool), rng=np.random.default_rng(0))
    assert torch.allclose(out["aux"][:, 0, 0], torch.tensor([-0.6, 0.0, -0.8]), atol=1e-6)
    assert torch.allclose(out["aux"].norm(dim=0), torch.ones(8, 8), atol=1e-6)


def test_masks_binarised_with_class_ids(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[2:6, 2:6] = 253   # some official masks store class ids, not 255
    for defect in ("good", "scratch"):
        _png(str(tmp_path / f"obj/test/{defect}/a.png"), np.full((16, 16, 3), 100, np.uint8))
    _png(str(tmp_path / "obj/train/good/a.png"), np.full((16, 16, 3), 100, np.uint8))
    _png(str(tmp_path / "obj/ground_truth/scratch/a_mask.png"), m)
    s = build_dataset("mvtec", str(tmp_path), "obj", "test", 16, 0)[1]
    assert s["mask"].sum() == 16 and set(s["mask"].unique().tolist()) == {0.0, 1.0}


def _realiad_tree(root, H=16, W=16):
    rng = np.random.default_rng(0)
    normal = np.zeros((H, W, 3), np.uint8)
    normal[...] = (128, 128, 0)   # x = y = 0, z = -1 in [0, 255] -> [-1, 1] encoding
    for split, defect in (("train", "good"), ("test", "good"), ("test", "dent")):
        d = os.path.join(root, "cat", split, defect)
        for i in range(2):
            _png(f"{d}/rgb/{i}.png", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
            _png(f"{d}/pseudo3d/{i}.png", normal)
            if defect != "good":
                _png(f"{d}/gt/{i}.png", np.full((H, W), 255, np.uint8))


def test_realiad_d3_normals_decoding(tmp_path):
    _realiad_tree(str(tmp_path))
    s = build_dataset("realiadd3", str(tmp_path), "cat", "test", 16, 3)[0]  # dent/0.png
    assert torch.allclose(s["aux"][:, 4, 4], torch.tensor([0.0039, 0.0039, -1.0]), atol=1e-2)
    flipped = build_dataset("realiadd3", str(tmp_path), "cat", "test", 16, 3, normal_flip="z")[0]
    assert flipped["aux"][2, 4, 4] > 0.99
    os.remove(tmp_path / "cat/test/dent/pseudo3d/1.png")
    with pytest.raises(DatasetError, match="normals missing"):
        build_dataset("realiadd3", str(tmp_path), "cat", "test", 16, 3)
    lenient = build_dataset("realiadd3", str(tmp_path), "cat", "test", 16, 3, require_normals=False)
    assert lenient.records[1].aux is None and lenient[1]["valid"].sum() == 0
    assert lenient[0]["valid"].sum() == 256


def test_rgbd_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, defect in (("train", "good"), ("test", "good"), ("test", "bump")):
        d = tmp_path / "thing" / split / defect
        _png(str(d / "rgb/a.png"), rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        depth = np.full((20, 20), 1000, np.uint16)
        depth[:3] = 0
        _png(str(d / "aux/a.png"), depth)
    _png(str(tmp_path / "thing/ground_truth/bump/a.png"), np.full((20, 20), 255, np.uint8))
    s = build_dataset("rgbd", str(tmp_path), "thing", "test", 20, 1)[1]
    assert s["aux"].shape == (1, 20, 20) and s["valid"][0, :3].sum() == 0 and s["valid"][0, 3:].all()


def test_bad_inputs_name_the_path(tmp_path):
    root = str(tmp_path)
    with pytest.raises(DatasetError, match="data root not found"):
        build_dataset("mvtec3d", root + "/nope", "widget", "train", 32, 3)
    obj = _mvtec3d_tree(root)
    with pytest.raises(DatasetError, match="object 'gadget' not found"):
        build_dataset("mvtec3d", root, "gadget", "train", 32, 3)
    with pytest.raises(DatasetError, match="splits"):
        build_dataset("mvtec3d", root, "widget", "val", 32, 3)
    with pytest.raises(DatasetError, match="aux_ch"):
        build_dataset("mvtec3d", root, "widget", "train", 32, 2)
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("kitti", root, "widget", "train", 32, 3)
    os.remove(os.path.join(obj, "train/good/xyz/001.tiff"))
    with pytest.raises(DatasetError, match=r"point cloud missing .*001.tiff"):
        build_dataset("mvtec3d", root, "widget", "train", 32, 3)
    # Truncated image and TIFF, wrong TIFF layout, mismatched sizes.
    rgb = os.path.join(obj, "test/good/rgb/000.png")
    data = open(rgb, "rb").read()
    open(rgb, "wb").write(data[: len(data) // 2])
    # check=False: each reader's own error, item by item (build_dataset's up-front check is tested below)
    # records: crack/000, crack/001, good/000, good/001
    ds = build_dataset("mvtec3d", root, "widget", "test", 32, 3, check=False)
    with pytest.raises(DatasetError, match=r"cannot read image .*000.png"):
        ds[2]
    tifffile.imwrite(os.path.join(obj, "test/good/xyz/001.tiff"), np.zeros((24, 32), np.float32))
    with pytest.raises(DatasetError, match=r"001.tiff must be an organised H x W x 3"):
        ds[3]
    _png(os.path.join(obj, "test/crack/gt/000.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match="must have the same size"):
        ds[0]
    tif = os.path.join(obj, "test/crack/xyz/001.tiff")
    data = open(tif, "rb").read()
    open(tif, "wb").write(data[: len(data) // 3])
    with pytest.raises(DatasetError, match=r"cannot read TIFF .*001.tiff"):
        ds[1]
    empty = tmp_path / "e" / "obj" / "train" / "good" / "rgb"
    empty.mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no images"):
        build_dataset("mvtec3d", str(tmp_path / "e"), "obj", "train", 32, 3)


def test_every_bad_file_is_reported_before_the_first_step(tmp_path):
    """build_dataset reads every file cheaply up front and names all the bad ones in one error."""
    obj = _mvtec3d_tree(str(tmp_path))
    assert len(build_dataset("mvtec3d", str(tmp_path), "widget", "test", 32, 3)) == 4
    rgb = os.path.join(obj, "test/good/rgb/000.png")
    data = open(rgb, "rb").read()
    open(rgb, "wb").write(data[: len(data) // 2])                               # truncated PNG
    open(os.path.join(obj, "test/good/rgb/001.png"), "wb").close()              # zero bytes
    tifffile.imwrite(os.path.join(obj, "test/crack/xyz/001.tiff"), np.zeros((24, 32), np.float32))  # wrong shape
    _png(os.path.join(obj, "test/crack/gt/000.png"), np.zeros((10, 10), np.uint8))  # mask of another size
    with pytest.raises(DatasetError) as err:
        build_dataset("mvtec3d", str(tmp_path), "widget", "test", 32, 3)
    msg = str(err.value)
    assert msg.startswith("4 bad file(s) in the test split") and "\n" not in msg
    for name in ("good/rgb/000.png", "good/rgb/001.png", "crack/xyz/001.tiff", "crack/gt/000.png"):
        assert name in msg, name
    tif = os.path.join(obj, "train/good/xyz/000.tiff")
    data = open(tif, "rb").read()
    open(tif, "wb").write(data[: len(data) // 3])                                # truncated TIFF
    with pytest.raises(DatasetError, match=r"1 bad file.*train/good/xyz/000.tiff"):
        build_dataset("mvtec3d", str(tmp_path), "widget", "train", 32, 3)


def test_non_finite_xyz_values_are_missing_points(tmp_path):
    obj = _mvtec3d_tree(str(tmp_path))
    tif = os.path.join(obj, "train/good/xyz/000.tiff")
    xyz = tifffile.imread(tif)
    xyz[5, 7] = [np.inf, 0.0, 1.0]
    xyz[9, 9, 2] = np.nan
    tifffile.imwrite(tif, xyz, photometric="minisblack")
    for aux_ch in (1, 3):
        ds = build_dataset("mvtec3d", str(tmp_path), "widget", "train", 32, aux_ch)
        s, clean = ds[0], ds[1]                                # 001.tiff holds the same points, all finite
        assert torch.isfinite(s["aux"]).all()
        assert s["valid"].sum() < clean["valid"].sum()


def test_each_dataset_class_owns_its_aux_channel_choices():
    from datasets import DATASETS, default_aux_ch
    assert {n: default_aux_ch(n) for n in DATASETS} == {"mulsenad": 1, "realiadd3": 3, "mvtec3d": 3, "eyecandies": 3,
                                                      "mvtec": 0, "rgbd": 1, "synthetic": 3}
    assert all(len(v) == 2 for v in DATASETS.values())          # the registry names modules, nothing more
    with pytest.raises(DatasetError, match="infrared .aux_ch=1. or RGB only.*got aux_ch=3"):
        build_dataset("mulsenad", "/nonexistent", "capsule", "train", 64, 3)
    with pytest.raises(DatasetError, match="RGB only .aux_ch=0.*got aux_ch=1"):
        build_dataset("mvtec", "/nonexistent", "hazelnut", "train", 64, 1)


def test_a_synthetic_object_written_as_a_tree_reads_back_its_rendered_normals(tmp_path):
    """The normals the loader estimates from the written xyz are the rendered ones on every pixel, border
    included: a model trained on the built-in synthetic objects scores the written parts as it scores its own
    test split (a ring of missing normals on the border once made every written part anomalous)."""
    from datasets.synthetic import write_mvtec3d_tree
    write_mvtec3d_tree(str(tmp_path), "disc", 64, counts={"train": 1, "validation": 1, "test": 2})
    mem = build_dataset("synthetic", None, "disc", "test", 64, 3, counts={"train": 1, "validation": 1, "test": 2})
    disk = build_dataset("mvtec3d", str(tmp_path), "disc", "test", 64, 3)
    assert len(mem) == len(disk) > 0
    key = lambda p: p.replace("synthetic://", "").replace("/rgb/", "/").rsplit(".", 1)[0].split("disc/")[-1]
    on_disk = {key(disk[i]["path"]): disk[i] for i in range(len(disk))}
    for i in range(len(mem)):
        a = mem[i]
        b = on_disk[key(a["path"])]
        assert torch.equal(a["rgb"], b["rgb"]) and b["valid"].all()
        assert (a["aux"] - b["aux"]).abs().max() < 0.05
