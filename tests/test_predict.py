"""predict.py (scoring folders of new parts, resuming, recalibrating) and export.py (ONNX parity)."""
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

import export as export_script
import predict as predict_script
from conftest import fit_random_bank, run_script
from engine import load_checkpoint
from MambaAlign import mambaalign_tiny

SIZE = 64


_cli = run_script


def _save(model, path, dataset="mulsenad"):
    torch.save({"model_type": model.model_type, "model": model.state_dict(), "config": model.config.to_dict(),
                "args": {"dataset": dataset, "img_size": SIZE}}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A MambaAlign tiny model with infrared aux (MulSen-AD files) and an RGB-only one, banks fitted on random
    images and a decision threshold stored."""
    d = tmp_path_factory.mktemp("predict_ckpt")
    out = {}
    for name, aux_ch in (("ir", 1), ("rgb", 0)):
        model = fit_random_bank(mambaalign_tiny(aux_ch=aux_ch), SIZE, SIZE).eval()
        model.threshold.fill_(0.0)
        out[name] = _save(model, d / f"{name}.pth")
    return out


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def parts(tmp_path):
    """10 parts in two sub-folders, infrared beside them by relative path; plus one truncated RGB file and one
    RGB image without its infrared image."""
    rng = np.random.default_rng(0)
    rgb, ir = tmp_path / "line" / "RGB", tmp_path / "line" / "IR"
    names = [f"{d}/{i}.png" for d in ("a", "b") for i in range(5)]
    for n in names:
        _png(str(rgb / n), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
        _png(str(ir / n), rng.integers(0, 255, (SIZE + 16, SIZE + 16), dtype=np.uint8))
    _png(str(rgb / "c" / "broken.png"), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    data = (rgb / "c" / "broken.png").read_bytes()
    (rgb / "c" / "broken.png").write_bytes(data[: len(data) // 2])
    _png(str(rgb / "c" / "lonely.png"), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    return rgb, ir, names


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _predict(ckpt, rgb, ir, out, *extra):
    argv = ["--checkpoint", str(ckpt), "--input", str(rgb), "--out_dir", str(out), "--batch_size", "3", "--quiet"]
    return argv + (["--aux_dir", str(ir)] if ir else []) + list(extra)


def test_bad_files_are_skipped_and_named_and_the_rest_scored(tmp_path, parts, checkpoints, capsys):
    rgb, ir, names = parts
    code, out, err = _cli(predict_script, _predict(checkpoints["ir"], rgb, ir, tmp_path / "p", "--save_vis"),
                          capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "p" / "predictions.csv")
    assert tuple(rows[0]) == predict_script.PREDICTION_COLUMNS
    assert sorted(r["path"] for r in rows) == sorted(str(rgb / n) for n in names)
    assert all(r["decision"] == str(int(float(r["score_logit"]) > 0.0)) for r in rows)
    assert all(r["aux_path"] == r["path"].replace(str(rgb), str(ir)) for r in rows)
    skipped = {r["path"]: r["reason"] for r in _rows(tmp_path / "p" / "skipped.csv")}
    assert set(skipped) == {str(rgb / "c" / "broken.png"), str(rgb / "c" / "lonely.png")}
    assert "aux" in skipped[str(rgb / "c" / "lonely.png")]
    assert "scored 10 image(s)" in out and "skipped 2" in out
    assert len(os.listdir(tmp_path / "p" / "vis" / "heatmaps")) == 10     # a/0.png and b/0.png: two names


def test_a_killed_run_resumes_to_the_same_csv(tmp_path, parts, checkpoints, capsys, monkeypatch):
    rgb, ir, _ = parts
    assert _cli(predict_script, _predict(checkpoints["ir"], rgb, ir, tmp_path / "whole"), capsys)[0] == 0
    calls = {"n": 0}
    real = predict_script.score_batch

    def dies_after_the_first_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(predict_script, "score_batch", dies_after_the_first_batch)
    with pytest.raises(KeyboardInterrupt):
        predict_script.main(predict_script.get_args_parser().parse_args(
            _predict(checkpoints["ir"], rgb, ir, tmp_path / "cut")))
    assert len(_rows(tmp_path / "cut" / "predictions.csv")) == 3           # the first batch, flushed
    monkeypatch.setattr(predict_script, "score_batch", real)
    code, _, err = _cli(predict_script, _predict(checkpoints["ir"], rgb, ir, tmp_path / "cut"), capsys)
    assert code != 0 and "--resume" in err                                  # never silently appended to
    # a row cut short by the kill is dropped and redone
    pred = tmp_path / "cut" / "predictions.csv"
    pred.write_text(pred.read_text() + str(rgb / "b" / "4.png") + ",")
    assert _cli(predict_script, _predict(checkpoints["ir"], rgb, ir, tmp_path / "cut", "--resume"), capsys)[0] == 0
    drop_ms = lambda rows: sorted(tuple((k, v) for k, v in r.items() if k != "ms") for r in rows)
    assert drop_ms(_rows(pred)) == drop_ms(_rows(tmp_path / "whole" / "predictions.csv"))
    assert len(_rows(pred)) == 10


def test_rgb_only_needs_saying_and_no_input_is_one_line(tmp_path, parts, checkpoints, capsys):
    rgb, ir, _ = parts
    code, _, err = _cli(predict_script, _predict(checkpoints["ir"], rgb, None, tmp_path / "p"), capsys)
    assert code == 2 and "--aux_dir" in err and "Traceback" not in err
    code, out, _ = _cli(predict_script, _predict(checkpoints["ir"], rgb, None, tmp_path / "p", "--rgb_only"), capsys)
    assert code == 0 and "scored 11 image(s)" in out                       # lonely.png has all it needs now
    code, _, err = _cli(predict_script, _predict(checkpoints["ir"], tmp_path / "nowhere", ir, tmp_path / "q"), capsys)
    assert code == 2 and "nowhere" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, _, err = _cli(predict_script, _predict(checkpoints["ir"], empty, ir, tmp_path / "r"), capsys)
    assert code == 2 and "no image files" in err


def test_a_run_where_nothing_can_be_scored_exits_non_zero(tmp_path, parts, checkpoints, capsys):
    rgb, _, _ = parts
    code, _, err = _cli(predict_script, _predict(checkpoints["ir"], rgb, tmp_path / "IRnone", tmp_path / "p"),
                        capsys)
    assert code == 2 and "--aux_dir" in err             # a missing aux folder is an argument error
    (tmp_path / "IRempty").mkdir()
    code, _, err = _cli(predict_script, _predict(checkpoints["ir"], rgb, tmp_path / "IRempty", tmp_path / "p"),
                        capsys)
    assert code == 2 and "no image could be scored" in err
    assert len(_rows(tmp_path / "p" / "skipped.csv")) == 12


def _calibrate(ckpt, good, ir, new, *extra):
    return ["--checkpoint", str(ckpt), "--calibrate_on", str(good), "--aux_dir", str(ir), "--save_checkpoint",
            str(new), "--quiet", "--target_fpr", "0.2"] + list(extra)


def test_recalibration_writes_a_new_checkpoint_and_refuses_what_it_cannot_use(tmp_path, parts, checkpoints,
                                                                              capsys):
    rgb, ir, names = parts
    src = checkpoints["ir"]
    before = src.read_bytes()
    good = rgb / "a"                                                          # 5 images
    code, _, err = _cli(predict_script, _calibrate(src, good, ir / "a", tmp_path / "new.pth"), capsys)
    assert code == 2 and "5 usable" in err and not (tmp_path / "new.pth").exists()
    code, _, err = _cli(predict_script, _calibrate(src, rgb / "c", ir, tmp_path / "new.pth"), capsys)
    assert code == 2 and "0 usable" in err and not (tmp_path / "new.pth").exists()
    (good / "readme.txt").write_text("these are good parts")
    code, _, err = _cli(predict_script, _calibrate(src, good, ir / "a", tmp_path / "new.pth", "--min_images", "5"),
                        capsys)
    assert code == 2 and "readme.txt" in err and not (tmp_path / "new.pth").exists()
    (good / "readme.txt").unlink()
    code, _, err = _cli(predict_script, _calibrate(src, good, ir / "a", src, "--min_images", "5"), capsys)
    assert code == 2 and "new file" in err
    assert src.read_bytes() == before                                         # the input is never rewritten
    whole = tmp_path / "all_good"
    for n in names:
        _png(str(whole / n.replace("/", "_")), np.asarray(Image.open(rgb / n)))
        _png(str(tmp_path / "all_ir" / n.replace("/", "_")), np.asarray(Image.open(ir / n)))
    code, out, err = _cli(predict_script, _calibrate(src, whole, tmp_path / "all_ir", tmp_path / "new.pth"), capsys)
    assert code == 0, err
    new = load_checkpoint(str(tmp_path / "new.pth"))
    rec = new["calibration"]
    assert rec["images"] == 10 and rec["quantile"] == pytest.approx(0.8) and rec["folder"] == str(whole)
    # the 0.8 quantile of 10 scores lies between the 2nd and the 3rd largest: a new good part like them scores
    # above it with a probability of 2/11 to 3/11 (metrics.exceedance_bounds), said in one line
    assert rec["new_good_flagged"] == pytest.approx([2 / 11, 3 / 11])
    assert "a new good part like these scores above it with a probability of 0.182 to 0.273 (target 0.200" in out
    # the threshold is what 20 % of these good parts exceed, and the scores are the ones predict.py gives
    assert _cli(predict_script, _predict(tmp_path / "new.pth", whole, tmp_path / "all_ir", tmp_path / "p"),
                capsys)[0] == 0
    scores = np.array([float(r["score_logit"]) for r in _rows(tmp_path / "p" / "predictions.csv")])
    assert float(new["model"]["threshold"]) == pytest.approx(np.quantile(scores, 0.8), abs=1e-5)
    assert all(r["threshold"] == f"{rec['threshold']:.6f}" for r in _rows(tmp_path / "p" / "predictions.csv"))
    assert src.read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mambaalign_ir", "mambaalign_rgb", "knn"])
def test_onnx_export_agrees_with_pytorch(tmp_path, checkpoints, parts, kind, capsys):
    """The whole model (bank search and score combination included) through onnxruntime: maps and score_logit
    within 1e-4 of PyTorch, at another batch size than the one traced; predict.py scores with the .onnx file."""
    if kind == "knn":
        from knn import KNNConfig, PatchKNN
        model = PatchKNN(KNNConfig(aux_ch=1, coreset_size=64))
        g = torch.Generator().manual_seed(0)
        model.fit([{"rgb": torch.randn(4, 3, SIZE, SIZE, generator=g), "aux": torch.randn(4, 1, SIZE, SIZE,
                                                                                          generator=g)}],
                  [{"rgb": torch.randn(3, 3, SIZE, SIZE, generator=g), "aux": torch.randn(3, 1, SIZE, SIZE,
                                                                                          generator=g)}])
        ckpt = tmp_path / "knn.pth"
        torch.save({"model_type": "knn", "model": model.state_dict(), "config": model.config.to_dict(),
                    "args": {"dataset": "mulsenad", "img_size": SIZE}}, ckpt)
    else:
        ckpt = checkpoints["ir" if kind.endswith("ir") else "rgb"]
    onnx_path = tmp_path / "model.onnx"
    diff = export_script.main(export_script.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt), "--output", str(onnx_path)]))
    assert max(diff.values()) <= 1e-4
    rgb, ir, _ = parts
    aux = [] if kind == "mambaalign_rgb" else None
    assert _cli(predict_script, _predict(ckpt, rgb, ir if aux is None else None, tmp_path / "pt"), capsys)[0] == 0
    assert _cli(predict_script, _predict(onnx_path, rgb, ir if aux is None else None, tmp_path / "ox"),
                capsys)[0] == 0
    pt, ox = _rows(tmp_path / "pt" / "predictions.csv"), _rows(tmp_path / "ox" / "predictions.csv")
    assert [r["path"] for r in pt] == [r["path"] for r in ox]
    assert np.allclose([float(r["score_logit"]) for r in pt], [float(r["score_logit"]) for r in ox], atol=1e-4)
    assert [r["decision"] for r in pt] == [r["decision"] for r in ox]


def test_an_mvtec3d_tree_is_scored_with_aux_beside_the_images(tmp_path, capsys):
    """--aux_sibling xyz: <defect>/rgb/000.png pairs with <defect>/xyz/000.tiff; xyz TIFFs and gt masks in the
    tree are not taken for parts."""
    from datasets.synthetic import write_mvtec3d_tree
    root = write_mvtec3d_tree(str(tmp_path / "tree"), "disc", size=SIZE, counts={"train": 2, "test_good": 2,
                                                                                 "test_defect": 1})
    model = fit_random_bank(mambaalign_tiny(aux_ch=3), SIZE, SIZE).eval()
    ckpt = _save(model, tmp_path / "normals.pth", dataset="synthetic")
    code, out, err = _cli(predict_script, ["--checkpoint", str(ckpt), "--input", os.path.join(root, "test"),
                                           "--aux_sibling", "xyz", "--out_dir", str(tmp_path / "p"), "--quiet"],
                          capsys)
    assert code == 0, err
    rows = _rows(tmp_path / "p" / "predictions.csv")
    assert len(rows) == 6 and all(r["aux_path"].endswith(".tiff") and "/xyz/" in r["aux_path"] for r in rows)
    assert not _rows(tmp_path / "p" / "skipped.csv")


def test_non_finite_input_is_skipped_never_decided(tmp_path, parts, checkpoints, capsys):
    """A float image holding NaN is a skipped file with its reason, not a part scored NaN and passed."""
    rgb, ir, _ = parts
    Image.fromarray(np.full((SIZE, SIZE), np.nan, np.float32)).save(rgb / "a" / "nan.tiff")
    _png(str(ir / "a" / "nan.png"), np.zeros((SIZE, SIZE), np.uint8))
    code, _, err = _cli(predict_script, _predict(checkpoints["ir"], rgb, ir, tmp_path / "p"), capsys)
    assert code == 0, err
    skipped = {r["path"]: r["reason"] for r in _rows(tmp_path / "p" / "skipped.csv")}
    assert "non-finite" in skipped[str(rgb / "a" / "nan.tiff")]
    assert str(rgb / "a" / "nan.tiff") not in {r["path"] for r in _rows(tmp_path / "p" / "predictions.csv")}
