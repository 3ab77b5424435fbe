"""train.py and eval.py end to end on the synthetic dataset (tiny shapes, CPU)."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import eval as eval_script
import train as train_script
from datasets import DatasetError
from engine import RunError
from conftest import fit_random_bank
from MambaAlign import MambaAlign, mambaalign_tiny

ERRORS = (SystemExit, RunError, DatasetError)   # what main() raises; run_cli turns each into one line
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "synthetic", "--object", "ring", "--img_size", "64", "--batch_size", "2", "--quiet",
        "--val_fraction", "0.05"]


def _train(out_dir, *extra):
    args = train_script.get_args_parser().parse_args(FAST + ["--out_dir", str(out_dir), *extra])
    return train_script.main(args)


def _losses(out_dir):
    with open(os.path.join(out_dir, "steps.jsonl")) as fh:
        return [json.loads(l)["loss"] for l in fh]


def test_short_run_writes_checkpoints_and_logs(tmp_path):
    _train(tmp_path, "--epochs", "1", "--max_steps", "2")
    for f in ("last.pth", "best_checkpoint.pth", "log.jsonl", "steps.jsonl", "splits.json"):
        assert (tmp_path / f).is_file(), f
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    for k in ("model", "config", "args", "optimizer", "scheduler", "scaler", "epoch", "step", "best", "rng"):
        assert k in ckpt, k
    assert ckpt["step"] == 2 and isinstance(ckpt["config"], dict)
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and set(record["val"]) >= {"image_auroc", "aupro", "criterion"}
    model = MambaAlign.from_checkpoint(tmp_path / "best_checkpoint.pth")
    assert model.config.aux_ch == 3


def test_bank_images_join_the_threshold_at_the_last_validation_and_in_the_best_checkpoint(tmp_path):
    """Validation decodes the bank images for the threshold only at the run's last validation; the best checkpoint,
    saved mid-run with the held-out views' threshold, then gets the full one (complete_best_threshold). A learning
    rate of ~0 leaves the weights unchanged (the updates round away) and the criterion flat, so epoch 1 stays the
    best and its completed calibration must equal the last epoch's own, number for number."""
    _train(tmp_path, "--epochs", "4", "--synthetic_train", "12", "--val_fraction", "0.25", "--lr", "1e-12",
           "--min_lr", "0", "--batch_size", "4")
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("val")]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["best"]["epoch"] == 1
    full = [r["val"]["calibration"]["normals"] > r["val"]["calibration"]["held_out"] for r in rows]
    assert full == [False, False, False, True]
    ckpt = torch.load(tmp_path / "best_checkpoint.pth", weights_only=True)
    best = ckpt["metrics"]["calibration"]
    assert best["normals"] > best["held_out"]
    assert best == rows[-1]["val"]["calibration"] == rows[-1]["best_calibration"]
    assert float(ckpt["model"]["threshold"]) == best["threshold"] and ckpt["epoch"] == 1
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    assert last["epoch"] == 4 and float(last["model"]["threshold"]) == rows[-1]["val"]["calibration"]["threshold"]


def test_a_run_stopped_by_max_steps_mid_epoch_completes_the_best_threshold(tmp_path):
    """--max_steps ends the run inside epoch 2 (no validation there: the best checkpoint of epoch 1 stays): the
    best checkpoint still leaves with the threshold over the bank images."""
    _train(tmp_path, "--epochs", "4", "--synthetic_train", "12", "--val_fraction", "0.25", "--batch_size", "4",
           "--max_steps", "3")
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 2 and not rows[-1]["complete"] and rows[-1]["val"] is None
    best = torch.load(tmp_path / "best_checkpoint.pth", weights_only=True)["metrics"]["calibration"]
    assert best["normals"] > best["held_out"] and best == rows[-1]["best_calibration"]


def _record(epoch):
    return {"epoch": epoch, "train_loss": 1.0, "val": None, "best": {"criterion": 0.5, "epoch": epoch}}


def test_the_best_checkpoint_of_a_complete_epoch_is_last_pth_linked_and_stays_when_last_moves_on(tmp_path):
    """_end_of_epoch writes last.pth once and gives best_checkpoint.pth the same file; the next epoch's last.pth
    is a new file, and the best checkpoint keeps its bytes."""
    args = train_script.get_args_parser().parse_args(FAST + ["--out_dir", str(tmp_path)])
    log_path, lines = tmp_path / "log.jsonl", []
    train_script._end_of_epoch(args, {"w": torch.arange(4.0)}, True, lines.append, str(log_path), _record(1))
    last, best = tmp_path / "last.pth", tmp_path / "best_checkpoint.pth"
    assert best.read_bytes() == last.read_bytes()
    assert os.stat(best).st_ino == os.stat(last).st_ino        # a link: the bytes were written once
    train_script._end_of_epoch(args, {"w": torch.ones(4)}, False, lines.append, str(log_path), _record(2))
    assert torch.equal(torch.load(best, weights_only=True)["w"], torch.arange(4.0))
    assert torch.equal(torch.load(last, weights_only=True)["w"], torch.ones(4))
    assert len(lines) == 2 and len(log_path.read_text().splitlines()) == 2
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_link_atomic_copies_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    import engine

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")
    src, dst = tmp_path / "last.pth", tmp_path / "best_checkpoint.pth"
    torch.save({"w": torch.arange(3.0)}, src)
    monkeypatch.setattr(engine.os, "link", no_links)
    engine.link_atomic(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_ino != os.stat(src).st_ino


def _count_rows(monkeypatch, cls, method: str) -> list:
    """Patch ``cls.method`` (whose first argument is a batch) to record each call's batch size; returns the list."""
    rows, real = [], getattr(cls, method)

    def counting(self, batch, *a, **k):
        rows.append(batch.shape[0])
        return real(self, batch, *a, **k)
    monkeypatch.setattr(cls, method, counting)
    return rows


def _count_modality_rows(monkeypatch) -> list:
    """Record the images each backbone pass runs, per modality (a two-modality forward counts its batch twice, a
    one-modality pass once); returns the list."""
    from rgbx_backbone import RGBXBackbone
    rows, forward, alone = [], RGBXBackbone.forward, RGBXBackbone.modality_features

    def counting_forward(self, rgb, aux=None):
        rows.append(rgb.shape[0] * (2 if aux is not None else 1))
        return forward(self, rgb, aux)

    def counting_alone(self, name, x):
        rows.append(x.shape[0])
        return alone(self, name, x)
    monkeypatch.setattr(RGBXBackbone, "forward", counting_forward)
    monkeypatch.setattr(RGBXBackbone, "modality_features", counting_alone)
    return rows


def test_train_views_that_are_their_image_as_it_is_reuse_its_encoding_and_train_the_same(tmp_path, monkeypatch):
    """Clean train views (no anomaly, aux present) take the encoding of their image from the calibration views or
    an earlier view instead of a backbone pass and a bank search, and a view with an anomaly in one modality
    takes the other modality's part from it: fewer images through the backbone per modality, and the same
    training to float rounding (a sample's features can round differently in a batch of another size: at 64 px
    here; on MulSen-AD capsule at 256 px the whole run's checkpoint came out bit for bit the same)."""
    encoded = _count_modality_rows(monkeypatch)
    run = ["--epochs", "3", "--synthetic_train", "12", "--val_fraction", "0.25", "--batch_size", "4",
           "--synth_pool", "3"]
    _train(tmp_path / "reuse", *run)
    with_reuse, encoded[:] = sum(encoded), []
    with monkeypatch.context() as m:       # only the earlier views' rows, none of the calibration views'
        m.setattr(train_script.SyntheticPool, "share", lambda self, cache, indices: None)
        _train(tmp_path / "views", *run)
    views_only, encoded[:] = sum(encoded), []
    with monkeypatch.context() as m:       # clean views reused, but every other view encodes both modalities
        m.setattr(MambaAlign, "encodes_one_modality", lambda self: False)
        _train(tmp_path / "both", *run)
    both_modalities, encoded[:] = sum(encoded), []
    real_init = train_script.SyntheticPool.__init__

    def no_reuse(self, *a, **k):
        real_init(self, *a, **k)
        self.plain = None
    monkeypatch.setattr(train_script.SyntheticPool, "__init__", no_reuse)
    _train(tmp_path / "plain", *run)
    without = sum(encoded)
    # 9 bank images x 3 views, a view clean 3 times in 10: several of the 27 must be reused, fewer without the
    # calibration views (a clean view of an image then takes its row only from an earlier view of it); an
    # anomaly in one modality (2 in 3 of the others) saves that view's other modality
    assert without - both_modalities >= 6 and without > views_only > with_reuse, (with_reuse, views_only, without)
    assert both_modalities - with_reuse >= 3, (with_reuse, both_modalities)
    # Every step's loss agrees to 1e-6: a wrong part of an encoding (the other modality's, another image's) moves
    # it by far more. The weights agree to less than one AdamW step (lr 1e-3): Adam scales a gradient by its own
    # running size, so a near-zero gradient whose float rounding differs moves its weight by up to lr either way
    # (seen: 2e-4 for the one-modality encodings at 64 px; the clean views' reuse alone stays within 1e-6).
    b = torch.load(tmp_path / "plain" / "last.pth", weights_only=True)["model"]
    for run_dir in ("reuse", "views", "both"):
        assert _losses(tmp_path / run_dir) == pytest.approx(_losses(tmp_path / "plain"), rel=1e-6), run_dir
        a = torch.load(tmp_path / run_dir / "last.pth", weights_only=True)["model"]
        assert a.keys() == b.keys()
        bad = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-3)]
        assert bad == [], (run_dir, max(float((a[k].float() - b[k].float()).abs().max()) for k in bad))


def test_calibration_views_take_the_bank_fits_backbone_features_and_train_the_same(tmp_path, monkeypatch):
    """The calibration views are the bank images as they are, and the bank fit has run the frozen backbone over
    them already: their encoding takes those features (one backbone pass fewer per calibration image) and the
    run is bit for bit the one that encodes them again (the same batches, so the very same tensors)."""
    from rgbx_backbone import RGBXBackbone
    rows = _count_rows(monkeypatch, RGBXBackbone, "forward")
    run = ["--epochs", "2", "--synthetic_train", "10", "--val_fraction", "0.2", "--batch_size", "4"]
    _train(tmp_path / "kept", *run)
    kept, rows[:] = sum(rows), []
    with monkeypatch.context() as m:
        m.setattr(train_script, "_known_features", lambda known, batch: None)
        _train(tmp_path / "again", *run)
    again = sum(rows)
    calibration_images = json.load(open(tmp_path / "kept" / "splits.json"))["train"]
    assert again - kept == len(calibration_images) == 8, (kept, again)
    a = torch.load(tmp_path / "kept" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "again" / "last.pth", weights_only=True)
    assert [k for k in b["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    assert a["metrics"]["calibration"] == b["metrics"]["calibration"]


def test_fit_bank_keeps_the_backbone_features_it_computed():
    """MambaAlign.fit_bank(keep=...) hands back each kept image's backbone output, the rows of the batch it ran
    in; it needs the batches' image indices."""
    model = mambaalign_tiny(aux_ch=1).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"rgb": torch.randn(3, 3, 64, 64, generator=g), "aux": torch.randn(3, 1, 64, 64, generator=g),
                "index": torch.arange(3 * k, 3 * k + 3)} for k in range(2)]
    held = [{"rgb": torch.randn(2, 3, 64, 64, generator=g), "aux": torch.randn(2, 1, 64, 64, generator=g)}]
    keep = {1: None, 4: None}
    model.fit_bank(batches, held, keep=keep)
    with torch.no_grad():
        for i, (k, b) in ((1, (0, 1)), (4, (1, 1))):
            feats = model.backbone(batches[k]["rgb"], batches[k]["aux"])
            assert len(keep[i]) == len(feats)
            for (r, a), (fr, fa) in zip(keep[i], feats):
                assert torch.equal(r, fr[b]) and torch.equal(a, fa[b])
    with pytest.raises(ValueError, match="index"):
        model.fit_bank([{k: v for k, v in batches[0].items() if k != "index"}], held, keep={0: None})


def test_resume_continues_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(a, "--epochs", "2", "--max_steps", "3")
    _train(b, "--epochs", "2", "--max_steps", "2")
    _train(b, "--epochs", "2", "--max_steps", "3", "--resume", "auto")
    la, lb = _losses(a), _losses(b)
    assert len(la) == 3 and len(lb) == 3
    assert lb[:2] == la[:2]
    assert lb[2] == pytest.approx(la[2], rel=1e-6, abs=1e-7)


def test_validation_is_carved_from_train_split(tmp_path):
    _train(tmp_path, "--epochs", "1", "--max_steps", "1", "--val_fraction", "0.2")
    splits = json.loads((tmp_path / "splits.json").read_text())
    from datasets import build_dataset
    train_paths = {r.rgb for r in build_dataset("synthetic", None, "ring", "train", 64, 3).records}
    test_paths = {r.rgb for r in build_dataset("synthetic", None, "ring", "test", 64, 3).records}
    assert splits["validation"] and set(splits["validation"]) <= train_paths
    assert not set(splits["validation"]) & test_paths and not set(splits["validation"]) & set(splits["train"])


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "mvtec", "--data_root", "/nonexistent/root", "--object", "x", "--aux_ch", "0"],
     "data root not found"),
    (["--dataset", "synthetic", "--object", "teapot"], "unknown synthetic object"),
    (["--dataset", "synthetic", "--object", "ring", "--aux_ch", "2"], "aux_ch"),
])
def test_bad_inputs_fail_before_training(tmp_path, argv, message):
    args = train_script.get_args_parser().parse_args(argv + ["--out_dir", str(tmp_path / "o"), "--quiet"])
    with pytest.raises(ERRORS, match=message):
        train_script.main(args)
    assert not (tmp_path / "o").exists()      # nothing is written before the checks pass


def test_aux_ch_mismatch_on_real_data(tmp_path, shared_data):
    args = train_script.get_args_parser().parse_args(
        ["--dataset", "mvtec", "--data_root", str(shared_data / "hazelnut_toy"), "--object", "hazelnut",
         "--aux_ch", "3", "--out_dir", str(tmp_path / "o")])
    with pytest.raises(ERRORS, match="aux_ch"):
        train_script.main(args)
    args = train_script.get_args_parser().parse_args(
        ["--dataset", "mulsenad", "--data_root", str(shared_data / "MulSen_AD_mini"), "--object", "capsule",
         "--aux_ch", "3", "--out_dir", str(tmp_path / "o")])
    with pytest.raises(ERRORS, match="aux_ch"):
        train_script.main(args)


def test_missing_split_unwritable_dir_and_foreign_resume(tmp_path):
    root = tmp_path / "tree" / "obj"
    (root / "test" / "good").mkdir(parents=True)
    (root / "train").mkdir()
    args = train_script.get_args_parser().parse_args(
        ["--dataset", "mvtec", "--data_root", str(tmp_path / "tree"), "--object", "obj", "--aux_ch", "0",
         "--out_dir", str(tmp_path / "o")])
    with pytest.raises(ERRORS, match="train/good not found"):
        train_script.main(args)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = train_script.get_args_parser().parse_args(FAST + ["--out_dir", str(blocker / "sub")])
    with pytest.raises(ERRORS, match="not writable"):
        train_script.main(args)
    other = tmp_path / "other"
    _train(other, "--epochs", "1", "--max_steps", "1", "--no_cmi")
    args = train_script.get_args_parser().parse_args(FAST + ["--out_dir", str(tmp_path / "r"),
                                                             "--resume", str(other / "last.pth")])
    with pytest.raises(ERRORS, match="another architecture.*use_cmi"):
        train_script.main(args)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = fit_random_bank(mambaalign_tiny(aux_ch=3), 64, 64)
    path = d / "model.pth"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(),
                "args": {"dataset": "synthetic", "object": "tile", "img_size": 64}}, path)
    raw = d / "raw.pth"
    torch.save(model.state_dict(), raw)
    cfg = d / "config.json"
    cfg.write_text(json.dumps(model.config.to_dict()))
    return path, raw, cfg


def test_eval_writes_reports_and_visualisations(tmp_path, tiny_checkpoint):
    path, _, _ = tiny_checkpoint
    args = eval_script.get_args_parser().parse_args(["--checkpoint", str(path), "--out_dir", str(tmp_path),
                                                     "--save_vis", "--quiet", "--batch_size", "16"])
    summary = eval_script.main(args)
    with open(tmp_path / "eval_results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == eval_script.CSV_COLUMNS and len(rows) == 80
    assert all(r["pixel_auroc"] == "" for r in rows if r["label"] == "0")
    assert all(r["pixel_auroc"] != "" for r in rows if r["label"] == "1")
    js = json.loads((tmp_path / "summary.json").read_text())
    assert set(js) >= {"overall", "per_defect", "per_object", "mean_over_objects", "settings", "counts"}
    import metrics
    assert set(js["overall"]) == set(metrics.METRIC_KEYS) | {"pixel_images_excluded"}
    assert set(js["per_defect"]) == {"pit", "scratch", "hairline", "specular"} and set(js["per_object"]) == {"tile"}
    assert "image_auroc" in (tmp_path / "summary.txt").read_text()
    assert len(os.listdir(tmp_path / "vis" / "heatmaps")) == 80
    assert len(os.listdir(tmp_path / "vis" / "overlays")) == 80
    assert summary["counts"]["images"] == 80


def test_summary_metrics_computed_in_threads_are_each_subsets_own(monkeypatch):
    """eval.summarise computes its subsets in threads: every row must be that subset's compute_metrics, under
    its own key (two objects, shared defect names, a degenerate subset: its NaN stays NaN, and no warning leaks
    out of the threads)."""
    import warnings
    import numpy as np
    import metrics
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    rng = np.random.default_rng(0)
    objects = ["a"] * 10 + ["b"] * 8 + ["c"] * 2          # c: good parts only, its metrics NaN
    defects = ["good"] * 4 + ["crack"] * 3 + ["hole"] * 3 + ["good"] * 4 + ["crack"] * 4 + ["good"] * 2
    label = np.array([d != "good" for d in defects], dtype=float)
    masks = np.zeros((20, 32, 32), bool)
    for i in np.flatnonzero(label):
        r, c = rng.integers(0, 24, 2)
        masks[i, r:r + 6, c:c + 6] = True
    maps = (rng.random((20, 32, 32)) + 1.5 * masks).astype(np.float32)
    maps[6] = 0.5            # a flat map: ties
    res = {"object": objects, "defect": defects, "label": label, "score_logit": maps.max(axis=(1, 2)),
           "maps": maps, "masks": masks}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = eval_script.summarise(res, 0.3)
    pick = lambda keep: np.flatnonzero(keep)
    objects_a, defects_a = np.array(objects), np.array(defects)
    want = {("overall",): pick(np.ones(20, bool)),
            ("per_defect", "crack"): pick((defects_a == "good") | (defects_a == "crack")),
            ("per_defect", "hole"): pick((defects_a == "good") | (defects_a == "hole")),
            **{("per_object", o): pick(objects_a == o) for o in "abc"}}
    got = {("overall",): summary["overall"], **{("per_defect", d): v for d, v in summary["per_defect"].items()},
           **{("per_object", o): v for o, v in summary["per_object"].items()}}
    assert set(got) == set(want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, idx in want.items():
            m = metrics.compute_metrics(res["score_logit"][idx], label[idx], maps[idx], masks[idx], 0.3)
            assert list(got[key]) == list(m), key
            assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(got[key].values(), m.values())), key
    assert math.isnan(summary["per_object"]["c"]["image_auroc"])
    assert list(summary["per_object"]) == ["a", "b", "c"] and list(summary["per_defect"]) == ["crack", "hole"]


def test_eval_raw_state_dict_needs_config(tmp_path, tiny_checkpoint):
    _, raw, cfg = tiny_checkpoint
    base = ["--checkpoint", str(raw), "--out_dir", str(tmp_path), "--quiet", "--dataset", "synthetic",
            "--object", "tile", "--img_size", "64", "--batch_size", "32"]
    with pytest.raises(ERRORS, match="config"):
        eval_script.main(eval_script.get_args_parser().parse_args(base))
    summary = eval_script.main(eval_script.get_args_parser().parse_args(base + ["--config", str(cfg),
                                                                               "--aux_shift", "3"]))
    assert summary["settings"]["aux_shift"] == 3.0


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MAMBAALIGN_COMPILE="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(ROOT, "train.py"), *FAST, "--epochs", "1", "--max_steps", "2", "--device", "cpu",
           "--out_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    model = MambaAlign.from_checkpoint(tmp_path / "best_checkpoint.pth")
    assert isinstance(model, MambaAlign)
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 2
    # Validation gathered from both ranks holds both classes (each image anomalous and clean): finite metrics.
    val = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["val"]
    assert math.isfinite(val["image_auroc"]) and math.isfinite(val["criterion"])


@pytest.mark.parametrize("what, re_exec", [("metrics", True), ("ablation", False)])
def test_bench_fixes_the_mmap_threshold_only_for_memory_benchmarks(monkeypatch, what, re_exec):
    """The memory benchmarks re-run bench.py with glibc's mmap threshold fixed; the ablation trains models and
    must not (every large tensor would be mapped and unmapped: twice the training time)."""
    import bench

    class ReExec(Exception):
        pass

    def fake_execv(*a):
        raise ReExec()

    monkeypatch.setenv(bench._MMAP_ENV, "")   # recorded as absent, so the teardown removes what main() sets
    monkeypatch.delenv(bench._MMAP_ENV)
    monkeypatch.setattr(bench.os, "execv", fake_execv)
    monkeypatch.setitem(bench.COMMANDS, what, lambda args: None)
    monkeypatch.setattr(bench, "_pin_threads", lambda n: torch.get_num_threads())
    args = bench.get_args_parser().parse_args([what])
    if re_exec:
        with pytest.raises(ReExec):
            bench.main(args)
    else:
        bench.main(args)


def test_bench_fit_runs_show_each_runs_ratios_and_their_median(monkeypatch, capsys):
    """bench.py fit --fit_runs 3: every phase's median and range over the interleaved runs, and each run's own
    ratios (computed within that run), with the median of those."""
    import bench
    calls = []

    def fake_run(args, train_ds, test_ds, common, out):
        r = len(calls)
        calls.append(common)
        floor, knn, ma = (2.0, 3.0, 4.0)[r], (8.0, 15.0, 10.0)[r], (40.0, 90.0, 50.0)[r]
        return {"floor train": floor / 2, "floor test": floor / 2, "floor": floor, "stacked": 1.5 * floor,
                "knn fit": knn / 2,
                "knn eval": knn / 2, "knn total": knn, "MambaAlign train": ma - 1, "MambaAlign eval": 1.0,
                "MambaAlign total": ma, "knn ratio": knn / floor, "MambaAlign ratio": ma / knn, "bank fit": 1.0,
                "epoch": 1.0, "n epochs": 2, "pool": 3.0, "MambaAlign rest": ma / 4, "rest ratio": ma / 4 / knn,
                "summary": {"overall": {"image_auroc": 0.9, "aupro_0.05": 0.5}}}
    monkeypatch.setattr(bench, "_fit_once", fake_run)
    args = bench.get_args_parser().parse_args(["fit", "--object", "ring", "--img_size", "64", "--fit_runs", "3",
                                                "--epochs", "2", "--out_dir", "unused"])
    args.device = torch.device("cpu")
    bench.bench_fit(args)
    out = capsys.readouterr().out
    assert len(calls) == 3 and "median (range) of 3 interleaved runs" in out
    # knn / floor per run: 4.00, 5.00, 2.50 -> median 4.00; MambaAlign / knn: 5.00, 6.00, 5.00 -> median 5.00
    assert ("knn fit + eval = 10.0 (8.0-15.0) s = 4.00x (2.50-5.00x) the bare backbone pass over the same train "
            "and test images: 3.0 (2.0-4.0) s") in out
    assert "= 5.00x (5.00-6.00x) the knn fit + eval (image AUROC 0.9000, AUPRO 0.05 0.5000)" in out
    # the recipe less its steps: 10, 22.5, 12.5 s = 1.25x, 1.50x, 1.25x the knn
    assert "less its epochs' training steps and validations = 12.5 (10.0-22.5) s = 1.25x (1.25-1.50x) the knn" in out
    rows = [l for l in out.splitlines() if l.startswith("| 1 ") or l.startswith("| 2 ") or l.startswith("| 3 ")]
    assert [r.split("|")[4].strip() for r in rows] == ["4.00x", "5.00x", "2.50x"]
    # the stacked network's pass beside the folded one, as a ratio within each run
    stacked = next(l for l in out.splitlines() if l.startswith("| the same pass, norms not folded"))
    cells = [c.strip() for c in stacked.split("|")[1:-1]]
    assert cells[1] == "4.5 (3.0-6.0)" and cells[3] == "1.50x (1.50-1.50x)"


def test_bench_fit_takes_the_steps_out_of_the_recipe_but_not_the_views():
    import bench
    rows = [{"epoch": 1, "time_s": 3.0, "pool_encode_s_total": 1.5}, {"epoch": 2, "time_s": 4.0,
                                                                       "pool_encode_s_total": 2.5},
            {"epoch": 3, "time_s": 1.0, "pool_encode_s_total": 2.5}]
    # 8 s of epochs, 2.5 s of them encoding views: 5.5 s of steps and validations out of 20 s
    assert bench._recipe_less_steps(20.0, rows) == pytest.approx(14.5)
    assert bench._recipe_less_steps(20.0, [{"epoch": 1, "time_s": 3.0}]) == pytest.approx(17.0)   # no pool


def test_model_flags_reach_the_config():
    parse = lambda *extra: train_script.get_args_parser().parse_args(FAST + ["--out_dir", "x", *extra])
    default = train_script.build_config(parse(), 3)
    assert (default.use_pmm, default.normality, default.image_score, default.global_align) == \
        (False, "bank", "head+bank", "none")                      # the tiny preset's choices (README: ablation)
    cfg = train_script.build_config(parse("--pmm", "on", "--global_align", "shift", "--image_score", "head"), 3)
    assert cfg.use_pmm and cfg.global_align == "shift" and cfg.image_score == "head"
    bare = train_script.build_config(parse("--no_bank"), 3)
    assert bare.normality == "none" and bare.image_score == "head"
    with pytest.raises(ERRORS, match="image_score='head\\+bank' needs normality='bank'"):
        train_script.build_config(parse("--no_bank", "--image_score", "head+bank"), 3)


def test_calibration_takes_every_bank_image_up_to_the_cap_then_a_seeded_subset():
    cap = train_script.CALIBRATION_IMAGES
    small = list(range(cap - 3))
    assert train_script.calibration_images(small, seed=0) == small
    big = list(range(10, 10 + 3 * cap))
    pick = train_script.calibration_images(big, seed=0)
    assert len(pick) == cap == len(set(pick)) and set(pick) <= set(big) and pick == sorted(pick)
    assert pick == train_script.calibration_images(big, seed=0)          # the same images on resume
    assert pick != train_script.calibration_images(big, seed=1)


@pytest.mark.slow
def test_bench_compare_reports_the_decision_beside_every_auroc(tmp_path, monkeypatch, capsys):
    """bench.py compare on one class, one seed: every method with a stored threshold (knn fused, MambaAlign)
    shows the share of good / anomalous test parts it flags; methods without one show '-'."""
    import bench
    monkeypatch.setattr(bench, "_compare_sets", lambda args: [("synthetic", None, "ring", 3, 1)])
    args = bench.get_args_parser().parse_args(["compare", "--img_size", "64", "--epochs", "1", "--seeds", "1",
                                               "--fpfh", "0", "--out_dir", str(tmp_path)])
    bench.bench_compare(args)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| synthetic/ring")}
    flagged = lambda method: rows[("synthetic/ring", method)][-2]
    assert flagged("floor (border-median colour distance)") == "-" and flagged("knn rgb") == "-"
    for method in ("knn fused", "MambaAlign RGB-only", "MambaAlign RGB + aux"):
        good, bad = (float(x) for x in flagged(method).split(" / "))
        assert 0 <= good <= 1 and 0 <= bad <= 1
    saved = json.loads((tmp_path / "compare.json").read_text())["synthetic/ring"]
    assert set(saved["MambaAlign RGB + aux"]["mean"]) >= set(bench.COMPARE_KEYS + bench.DECISION_KEYS)


@pytest.mark.slow
def test_bench_runs_again_into_its_own_folders(tmp_path, capsys):
    """A second bench.py ablation or compare into the same --out_dir replaces its runs (train.py would refuse a
    folder that holds one without --overwrite) and prints the values the first printed."""
    import bench
    args = bench.get_args_parser().parse_args(["ablation", "--object", "ring", "--img_size", "64", "--epochs", "1",
                                               "--seeds", "1", "--variants", "full", "--out_dir",
                                               str(tmp_path / "ablation")])
    tables = []
    for _ in range(2):
        bench.bench_ablation(args)
        rows = [l.split("|")[1:-2] for l in capsys.readouterr().out.splitlines() if l.startswith("| full")]
        tables.append(rows)                # every column but the minutes per run
    assert tables[0] == tables[1] and len(tables[0]) == 1
    args = bench.get_args_parser().parse_args(["compare", "--img_size", "64", "--epochs", "1"])
    for _ in range(2):
        knn = bench._compare_knn(args, "synthetic", None, "ring", 3, str(tmp_path / "compare" / "knn"))
        model = bench._compare_model(args, "synthetic", None, "ring", ["--aux_ch", "3"], 0,
                                     str(tmp_path / "compare" / "seed0"))
    assert "knn fused" in knn and 0 <= model["image_auroc"] <= 1


def test_bench_errors_are_one_line():
    """A data error in a benchmark is one line on stderr and exit status 2, as in the other scripts."""
    proc = subprocess.run([sys.executable, "bench.py", "fit", "--dataset", "mulsenad", "--data_root",
                           os.path.join(ROOT, "no_such_root"), "--object", "capsule"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"bench.py: error: data root not found: "
                                                f"{os.path.join(ROOT, 'no_such_root')}"]


def test_bench_decision_rates_count_scores_above_the_threshold(tmp_path):
    import bench
    rows = [("a", 0, 1.0), ("b", 0, 3.0), ("c", 0, 0.5), ("d", 0, 2.5), ("e", 1, 2.0), ("f", 1, 4.0)]
    with open(tmp_path / "eval_results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "score_logit"])
        w.writerows([(p, y, s) for p, y, s in rows])
    assert bench._rates_at(str(tmp_path), 2.0) == (0.5, 0.5)          # strictly above, as eval.py decides
    assert bench._rates_at(str(tmp_path), 9.0) == (0.0, 0.0)
    assert bench._flagged_cell({"good_flagged": 0.5, "anomalous_flagged": 1.0}) == "0.50 / 1.00"
    assert bench._flagged_cell({"good_flagged": math.nan, "anomalous_flagged": math.nan}) == "-"


def test_bench_model_times_only_the_presets_asked_for(capsys):
    """bench.py model --presets tiny: one row, the tiny preset's (the base preset compiles its scans for minutes);
    an unknown preset is one clear line."""
    import bench
    args = bench.get_args_parser().parse_args(["model", "--presets", "tiny", "--size", "64", "--repeats", "1"])
    args.device = torch.device("cpu")
    bench.bench_model(args)
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and "preset" not in l]
    assert [r.split("|")[1].strip() for r in rows] == ["tiny"]
    with pytest.raises(SystemExit, match="--presets 'tiny,huge': choose among base, tiny"):
        bench.bench_model(bench.get_args_parser().parse_args(["model", "--presets", "tiny,huge"]))
