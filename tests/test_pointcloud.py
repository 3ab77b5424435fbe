"""Point clouds through open3d: reading, background plane, FPFH, the knn's FPFH bank and MulSen-AD's third sensor."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import eval as eval_script
import prepare_data
import pointcloud
import train as train_script
from datasets import build_dataset
from datasets.synthetic import (depth_to_xyz, height_mesh, render_sample, write_mulsen_tree, write_mvtec3d_tree,
                                write_stl)
from conftest import run_script


_cli = run_script


def _former_ransac_background(xyz, dist, border=0.1, iterations=300, seed=0):
    """The hand-written RANSAC prepare_data.py had before open3d (kept here as the reference)."""
    from scipy import ndimage
    H, W, _ = xyz.shape
    valid = np.any(xyz != 0, axis=2)
    b = max(1, int(round(border * min(H, W))))
    band = np.zeros((H, W), bool)
    band[:b], band[-b:], band[:, :b], band[:, -b:] = True, True, True, True
    pts = xyz[band & valid].astype(np.float64)
    rng = np.random.default_rng(seed)
    best_inl = None
    for _ in range(iterations):
        a, b_, c = pts[rng.choice(len(pts), 3, replace=False)]
        n = np.cross(b_ - a, c - a)
        if np.linalg.norm(n) < 1e-12:
            continue
        n /= np.linalg.norm(n)
        inl = np.abs(pts @ n - n @ a) < dist
        if best_inl is None or inl.sum() > best_inl.sum():
            best_inl = inl
    p = pts[best_inl]
    n = np.linalg.svd(p - p.mean(0))[2][-1]
    d = -n @ p.mean(0)
    valid &= ~(np.abs(xyz.reshape(-1, 3) @ n + d).reshape(H, W) < dist)
    lab, k = ndimage.label(valid, structure=np.ones((3, 3), bool))
    if k > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        valid = lab == int(np.argmax(sizes))
    return valid


@pytest.mark.parametrize("obj", ["disc", "ring", "tile"])
def test_plane_removal_agrees_with_the_former_ransac(obj):
    """open3d's segment_plane keeps the same points as the former RANSAC on the synthetic objects' clouds (tolerance:
    0.5 % of the pixels), and keeps the object."""
    s = render_sample(np.random.default_rng(3), 96, obj, "pit")
    xyz = depth_to_xyz(s["depth"])
    new = np.any(pointcloud.remove_background(xyz, dist=1.0) != 0, axis=2)
    old = _former_ransac_background(xyz, dist=1.0)
    assert (new != old).mean() <= 0.005
    assert new[s["object_mask"]].mean() > 0.9 and new[~s["object_mask"]].mean() < 0.01    # (bevels touch the table)


def _plate(dent: bool, seed: int, n: int = 64):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    z = 0.002 * rng.standard_normal((n, n))
    inside = (xx - n / 2) ** 2 + (yy - n / 2) ** 2 < 8 ** 2
    if dent:
        z -= inside * np.sqrt(np.clip(64 - (xx - n / 2) ** 2 - (yy - n / 2) ** 2, 0, None)) * 0.5
    return np.stack([xx, yy, z], -1).reshape(-1, 3), inside.ravel()


def test_fpfh_is_farther_from_a_flat_bank_inside_a_dent_than_outside():
    """FPFH are not noise: against a bank of flat plates, the points of a dent lie far from every bank feature,
    the flat points around it do not."""
    from knn import nearest_distance
    bank = torch.cat([torch.from_numpy(pointcloud.fpfh_features(_plate(False, s)[0])) for s in (1, 2)])
    pts, inside = _plate(True, 3)
    d = nearest_distance(torch.from_numpy(pointcloud.fpfh_features(pts)), bank).numpy()
    ring = ~inside & (np.hypot(pts[:, 0] - 32, pts[:, 1] - 32) > 14)       # clear of the dent's rim
    assert np.median(d[inside]) > 3 * np.median(d[ring])
    assert np.median(d[inside]) > np.quantile(d[ring], 0.95)


def test_stl_ply_and_pcd_read_to_the_same_points(tmp_path):
    o3d = pointcloud.open3d()
    s = render_sample(np.random.default_rng(0), 48, "disc")
    verts, faces = height_mesh(s["depth"].max() - s["depth"], s["object_mask"])
    write_stl(str(tmp_path / "part.stl"), verts, faces)
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(verts), o3d.utility.Vector3iVector(faces))
    o3d.io.write_triangle_mesh(str(tmp_path / "part_mesh.ply"), mesh)
    a, b = pointcloud.read_points(str(tmp_path / "part.stl")), pointcloud.read_points(str(tmp_path / "part_mesh.ply"))
    assert a.shape == (pointcloud.MESH_POINTS, 3) and np.allclose(a, b, atol=1e-4)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(a))
    o3d.io.write_point_cloud(str(tmp_path / "part.ply"), cloud)
    o3d.io.write_point_cloud(str(tmp_path / "part.pcd"), cloud)
    for name in ("part.ply", "part.pcd"):
        assert np.allclose(pointcloud.read_points(str(tmp_path / name)), a, atol=1e-4), name
    xyz = depth_to_xyz(s["depth"])
    import tifffile
    tifffile.imwrite(tmp_path / "part.tiff", xyz, photometric="minisblack")
    assert np.allclose(pointcloud.read_points(str(tmp_path / "part.tiff")), xyz.reshape(-1, 3), atol=1e-3)
    (tmp_path / "cut.stl").write_bytes((tmp_path / "part.stl").read_bytes()[:50])
    from datasets import DatasetError
    with pytest.raises(DatasetError, match="cut.stl"):
        pointcloud.read_points(str(tmp_path / "cut.stl"))


def test_a_missing_open3d_is_one_line_and_the_rest_still_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pointcloud, "_o3d", None)
    monkeypatch.setitem(sys.modules, "open3d", None)             # import open3d -> ImportError
    tree = write_mvtec3d_tree(str(tmp_path / "t"), "disc", 32, counts={"train": 6, "test_good": 2, "test_defect": 1})
    argv = ["--model", "knn", "--dataset", "mvtec3d", "--data_root", str(tmp_path / "t"), "--object", "disc",
            "--img_size", "32", "--aux_feature", "fpfh", "--val_fraction", "0.34", "--quiet", "--out_dir",
            str(tmp_path / "o")]
    code, _, err = _cli(train_script, argv, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "open3d" in err and "pip install" in err
    assert os.path.isdir(tree)
    # a MulSen-AD tree with point clouds: --pointcloud auto says why it goes on from the images alone
    write_mulsen_tree(str(tmp_path / "m"), "disc", 32, counts={"train": 6, "test_good": 2, "test_defect": 1})
    argv = ["--model", "knn", "--dataset", "mulsenad", "--data_root", str(tmp_path / "m"), "--object", "disc",
            "--img_size", "32", "--val_fraction", "0.34", "--quiet", "--out_dir", str(tmp_path / "k")]
    code, out, err = _cli(train_script, argv, capsys)
    assert code == 0, err
    assert out.count("point clouds found but not used") == 1
    code, _, err = _cli(train_script, argv[:-1] + [str(tmp_path / "k2"), "--pointcloud", "on"], capsys)
    assert code == 2 and "open3d" in err


@pytest.mark.slow
def test_a_mulsen_tree_with_point_clouds_trains_and_evaluates(tmp_path, capsys):
    """The third sensor: an FPFH bank of the train parts' meshes travels in the checkpoint; eval fuses each test
    part's object score with its image score and writes per-point scores as coloured .ply files."""
    root = tmp_path / "m"
    write_mulsen_tree(str(root), "disc", 64, counts={"train": 10, "test_good": 3, "test_defect": 2})
    os.remove(root / "disc" / "Pointcloud" / "test" / "pit" / "4.stl")          # one part without its cloud
    for model, extra in (("knn", ["--model", "knn", "--coreset_size", "128"]),
                         ("mambaalign", ["--epochs", "1", "--max_steps", "2", "--batch_size", "4"])):
        out = tmp_path / model
        argv = ["--dataset", "mulsenad", "--data_root", str(root), "--object", "disc", "--img_size", "64",
                "--val_fraction", "0.25", "--quiet", "--pointcloud", "on", "--out_dir", str(out)] + extra
        code, stdout, err = _cli(train_script, argv, capsys)
        assert code == 0, err
        assert "point-cloud bank" in stdout
        ckpt = torch.load(out / "best_checkpoint.pth", weights_only=True)
        assert ckpt["pointcloud"]["bank"].shape[1] == pointcloud.FPFH_DIM
        code, stdout, err = _cli(eval_script, ["--checkpoint", str(out / "best_checkpoint.pth"), "--out_dir",
                                               str(out / "eval"), "--quiet", "--save_vis"], capsys)
        assert code == 0, err
        summary = json.loads((out / "eval" / "summary.json").read_text())
        fused = summary["with_point_clouds"]
        assert fused["parts"] == 11 and fused["parts_with_cloud"] == 10
        assert "1 test part(s) have no point cloud" in stdout
        assert len(list((out / "eval" / "vis" / "clouds").glob("*.ply"))) == 10
        import csv
        rows = list(csv.DictReader(open(out / "eval" / "eval_results.csv")))
        assert sum(r["cloud_score"] == "" for r in rows) == 1 and all(r["fused_score_logit"] for r in rows)


@pytest.mark.slow
def test_knn_fpfh_bank_on_a_prepared_tree_reads_the_cache(tmp_path, capsys, monkeypatch):
    """BTF's setting: RGB bank + FPFH bank. prepare_data.py --fpfh caches the features; loading reads them (no
    FPFH is computed at fit or eval time) and a prepared sample loads fast."""
    write_mvtec3d_tree(str(tmp_path / "raw"), "disc", 64, counts={"train": 8, "test_good": 2, "test_defect": 1})
    counts = prepare_data.prepare_mvtec3d(str(tmp_path / "raw"), str(tmp_path / "prep"), progress=False, fpfh=True,
                                          dist=1.0)
    assert counts["processed"] == 8 + 2 + 2 + 4 and "failed" not in counts
    import datasets.mvtec3d as mvtec3d
    monkeypatch.setattr(mvtec3d, "fpfh_full_res", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    out = tmp_path / "knn"
    argv = ["--model", "knn", "--dataset", "mvtec3d", "--data_root", str(tmp_path / "prep"), "--object", "disc",
            "--img_size", "64", "--aux_feature", "fpfh", "--coreset_size", "128", "--val_fraction", "0.25",
            "--quiet", "--out_dir", str(out)]
    code, _, err = _cli(train_script, argv, capsys)
    assert code == 0, err
    summary = eval_script.main(eval_script.get_args_parser().parse_args(
        ["--checkpoint", str(out / "best_checkpoint.pth"), "--out_dir", str(out / "eval"), "--quiet"]))
    assert np.isfinite(summary["overall"]["image_auroc"])
    ds = build_dataset("mvtec3d", str(tmp_path / "prep"), "disc", "train", 64, 33)
    assert ds[0]["aux"].shape == (33, 64, 64) and ds[0]["valid"].sum() > 0


# --------------------------------------------------------------------------------------------------------
# MambaAlign with an FPFH bank (aux_ch 36: normals for the CNN, FPFH for the bank)
# --------------------------------------------------------------------------------------------------------

def test_normals_plus_fpfh_is_the_two_modalities_side_by_side(tmp_path):
    write_mvtec3d_tree(str(tmp_path / "t"), "disc", 64, counts={"train": 2, "test_good": 1, "test_defect": 1})
    both, normals, fpfh = (build_dataset("mvtec3d", str(tmp_path / "t"), "disc", "train", 64, ch)[0]
                           for ch in (36, 3, 33))
    assert both["aux"].shape == (36, 64, 64)
    inside = (both["valid"][0] > 0) & (normals["valid"][0] > 0) & (fpfh["valid"][0] > 0)
    assert inside.sum() > 100
    assert torch.allclose(both["aux"][:3][:, inside], normals["aux"][:, inside], atol=1e-5)
    assert torch.allclose(both["aux"][3:][:, inside], fpfh["aux"][:, inside], atol=1e-4)
    ds = build_dataset("mvtec3d", str(tmp_path / "t"), "disc", "train", 64, 36)
    xyz = ds.xyz_at(0)
    assert xyz.shape == (3, 64, 64) and (xyz[2] > 0).float().mean() > 0.5
    from datasets import DatasetError
    flipping = build_dataset("mvtec3d", str(tmp_path / "t"), "disc", "train", 64, 36, hflip=0.5)
    with pytest.raises(DatasetError, match="flips"):
        flipping.xyz_at(0)


def test_a_geometry_anomaly_changes_the_fpfh_where_the_surface_moved():
    """Training anomalies of normals + FPFH displace the points by the height field that bends the normals and
    recompute the FPFH there: inside the labelled region the FPFH changes, far from it they do not (a test that
    fails if the FPFH stayed as it was, or changed everywhere)."""
    from datasets.synthesis import AnomalySynthesizer, SynthesisDataset, misalign
    ds = build_dataset("synthetic", None, "disc", "train", 96, 36)
    synth = AnomalySynthesizer("normals+fpfh", mode="aux", synth_prob=1.0)
    clean = ds[0]["aux"]
    changed = 0
    for seed in range(3):
        s = SynthesisDataset(ds, synth, seed=seed)[0]
        m = s["mask"][0] > 0.5
        assert m.sum() > 0
        far = ~(torch.nn.functional.max_pool2d(m[None, None].float(), 25, 1, 12)[0, 0] > 0)
        d = (s["aux"][3:] - clean[3:]).abs().sum(0)
        assert d[far].mean() < 0.02 * d[m].mean(), (d[far].mean(), d[m].mean())
        changed += d[m].mean() > 1.0                                   # FPFH bins are percentages
        assert (s["aux"][:3] - clean[:3]).norm(dim=0)[m].mean() > 0.05    # the normals bend there too
    assert changed == 3
    with pytest.raises(ValueError, match="xyz"):
        synth({**ds[0]}, np.random.default_rng(0), inject=True)
    turned = misalign(clean, np.random.default_rng(0), 2.0, 5.0, aux_kind="normals+fpfh")
    assert turned.shape == clean.shape and torch.allclose(turned[:3].norm(dim=0)[20:-20, 20:-20],
                                                          torch.ones(56, 56), atol=1e-4)


def test_mambaalign_fpfh_bank_holds_fpfh_patches_and_the_cnn_reads_the_normals():
    from knn import fpfh_patches
    from MambaAlign import MambaAlign, MambaAlignConfig
    with pytest.raises(ValueError, match="bank_aux='fpfh'"):
        MambaAlignConfig.preset("tiny", aux_ch=3, bank_aux="fpfh")
    torch.manual_seed(0)
    model = MambaAlign(MambaAlignConfig.preset("tiny", aux_ch=36, bank_aux="fpfh")).eval()
    assert model.backbone.aux_ch == 3
    rgb = torch.randn(2, 3, 64, 64)
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 64, 64), dim=1)
    aux = torch.cat([normals, 10 * torch.rand(2, 33, 64, 64)], 1)
    patches = model.bank_patches(rgb, aux)
    assert torch.allclose(patches["aux"], fpfh_patches(aux[:, 3:], 8, model.config.bank_pool))
    model.fit_bank([{"rgb": rgb, "aux": aux, "index": torch.arange(2)}], [{"rgb": rgb, "aux": aux}])
    assert model.bank.bank_aux.shape[1] == 33 and model.bank.bank_rgb.shape[1] != 33
    # the CNN's features do not depend on the FPFH channels; the bank's aux map does
    other = torch.cat([aux[:, :3], torch.rand(2, 33, 64, 64)], 1)
    a, b = model.encode(rgb, aux), model.encode(rgb, other)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a["feats"], b["feats"]))
    assert torch.equal(a["bank_maps"][:, 0], b["bank_maps"][:, 0])
    assert not torch.allclose(a["bank_maps"][:, 1], b["bank_maps"][:, 1])


@pytest.mark.slow
def test_mambaalign_with_the_fpfh_bank_trains_evaluates_and_predicts(tmp_path, capsys):
    import predict as predict_script
    write_mvtec3d_tree(str(tmp_path / "raw"), "disc", 64, counts={"train": 8, "test_good": 2, "test_defect": 1})
    prepare_data.prepare_mvtec3d(str(tmp_path / "raw"), str(tmp_path / "prep"), progress=False, fpfh=True, dist=1.0)
    out = tmp_path / "ma"
    argv = ["--dataset", "mvtec3d", "--data_root", str(tmp_path / "prep"), "--object", "disc", "--img_size", "64",
            "--aux_feature", "fpfh", "--epochs", "1", "--batch_size", "4", "--val_fraction", "0.25", "--quiet",
            "--out_dir", str(out)]
    code, _, err = _cli(train_script, argv, capsys)
    assert code == 0, err
    ckpt = torch.load(out / "best_checkpoint.pth", weights_only=True)
    assert ckpt["config"]["bank_aux"] == "fpfh" and ckpt["config"]["aux_ch"] == 36
    assert ckpt["model"]["bank.bank_aux"].shape[1] == pointcloud.FPFH_DIM
    code, _, err = _cli(eval_script, ["--checkpoint", str(out / "best_checkpoint.pth"), "--out_dir",
                                      str(out / "eval"), "--quiet"], capsys)
    assert code == 0, err
    assert np.isfinite(json.loads((out / "eval" / "summary.json").read_text())["overall"]["image_auroc"])
    test = tmp_path / "prep" / "disc" / "test" / "good"
    code, _, err = _cli(predict_script, ["--checkpoint", str(out / "best_checkpoint.pth"), "--input", str(test / "rgb"),
                                         "--aux_dir", str(test / "xyz"), "--out_dir", str(out / "pred"), "--quiet"],
                        capsys)
    assert code == 0, err
    assert len((out / "pred" / "predictions.csv").read_text().strip().splitlines()) == 1 + 2
    code, _, err = _cli(train_script, argv[:-1] + [str(tmp_path / "bad"), "--aux_ch", "3"], capsys)
    assert code == 2 and "36" in err and "Traceback" not in err
