"""Bad input never ends in a traceback: every script turns it into one line naming the file or value, exits
non-zero, and writes nothing to --out_dir."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import train as train_script
from conftest import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_cli = run_script


def _one_line_error(code, err, *needles):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert "Traceback" not in err
    last = lines[-1]
    assert "error" in last, err
    for n in needles:
        assert n in last, (n, last)


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def tree(tmp_path):
    """A small MVTec-AD-style RGB tree: 6 train, 2 good and 2 defective test images with masks."""
    rng = np.random.default_rng(0)
    obj = tmp_path / "tree" / "obj"
    for i in range(6):
        _png(str(obj / "train" / "good" / f"{i:03d}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for i in range(2):
        _png(str(obj / "test" / "good" / f"{i:03d}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        _png(str(obj / "test" / "hole" / f"{i:03d}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        m = np.zeros((64, 64), np.uint8)
        m[10:20, 10:20] = 255
        _png(str(obj / "ground_truth" / "hole" / f"{i:03d}_mask.png"), m)
    return tmp_path / "tree"


TRAIN = ["--dataset", "synthetic", "--object", "ring", "--img_size", "64", "--batch_size", "2", "--quiet"]


@pytest.mark.parametrize("extra,needle", [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"), (["--max_steps", "-5"], "--max_steps"),
    (["--lr", "-1"], "--lr"), (["--synth_prob", "7"], "--synth_prob"), (["--img_size", "100"], "--img_size"),
    (["--batch_size", "0"], "--batch_size"), (["--val_fraction", "1"], "--val_fraction"),
    (["--lr", "nan"], "--lr"),
])
def test_train_numeric_flags_are_range_checked(tmp_path, capsys, extra, needle):
    code, _, err = _cli(train_script, TRAIN + extra + ["--out_dir", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_train_unreadable_backbone_weights_are_one_line(tmp_path, capsys, backbone):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = _cli(train_script, TRAIN + ["--backbone", backbone, "--backbone_weights", str(bad),
                                               "--out_dir", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, "weights.pth")
    assert "weights_only=False" not in err and "set to `False`" not in err
    assert not (tmp_path / "o").exists()


def test_train_bad_file_in_the_split_stops_before_the_first_step(tmp_path, tree, capsys):
    bad = tree / "obj" / "train" / "good" / "004.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    (tree / "obj" / "train" / "good" / "005.png").write_bytes(b"")
    argv = ["--dataset", "mvtec", "--data_root", str(tree), "--object", "obj", "--img_size", "64",
            "--max_steps", "2", "--quiet", "--out_dir", str(tmp_path / "o")]
    code, _, err = _cli(train_script, argv, capsys)
    _one_line_error(code, err, "2 bad file(s)", "004.png", "005.png")
    assert not (tmp_path / "o").exists()


def test_train_resume_auto_says_when_it_starts_fresh_and_stale_temporaries_go(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    stale = out / "last.pth.tmp.99999"
    stale.write_bytes(b"x" * 100)
    code, stdout, err = _cli(train_script, TRAIN + ["--max_steps", "1", "--resume", "auto", "--val_fraction", "0.05",
                                                    "--out_dir", str(out)], capsys)
    assert code == 0, err
    assert "starting from scratch" in stdout and f"removed {stale}" in stdout
    assert not stale.exists()


def test_resume_after_a_max_steps_stop_keeps_the_best_and_writes_no_duplicate_rows(tmp_path, capsys):
    out = str(tmp_path / "o")
    base = TRAIN + ["--val_fraction", "0.05", "--out_dir", out]          # 152 train images: 76 steps per epoch
    assert _cli(train_script, base + ["--epochs", "1"], capsys)[0] == 0
    best = torch.load(os.path.join(out, "best_checkpoint.pth"), weights_only=True)
    assert best["step"] == 76
    # stopped 3 steps into epoch 2: the best checkpoint (a complete epoch) is not replaced by a mid-epoch model
    assert _cli(train_script, base + ["--epochs", "3", "--max_steps", "79", "--resume", "auto"], capsys)[0] == 0
    assert torch.load(os.path.join(out, "best_checkpoint.pth"), weights_only=True)["step"] == 76
    # resumed to the end of epoch 2: the partial epoch-2 row is replaced, not duplicated
    assert _cli(train_script, base + ["--epochs", "3", "--max_steps", "152", "--resume", "auto"], capsys)[0] == 0
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert sum("memory_bank" in r for r in rows) == 1        # built once, by the first run; resumes load it
    rows = [r for r in rows if "epoch" in r]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["complete"] for r in rows)
    steps = [json.loads(l)["step"] for l in open(os.path.join(out, "steps.jsonl"))]
    assert steps == list(range(1, 153))


@pytest.fixture
def knn_ckpt(tmp_path, tree, capsys):
    out = tmp_path / "knn"
    code, _, err = _cli(train_script, ["--model", "knn", "--dataset", "mvtec", "--data_root", str(tree), "--object",
                                       "obj", "--img_size", "64", "--quiet", "--coreset_size", "64",
                                       "--val_fraction", "0.34", "--out_dir", str(out)], capsys)
    assert code == 0, err
    return out / "best_checkpoint.pth"


def test_eval_bad_checkpoints_are_one_line(tmp_path, capsys):
    rnd = tmp_path / "random.pth"
    rnd.write_bytes(os.urandom(4096))
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "config": {"aux_ch": 0}}, good)
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(good.read_bytes()[:200])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    for path, needle in ((tmp_path / "missing.pth", "not found"), (rnd, "random.pth"), (trunc, "truncated.pth"),
                         (evil, "refused"), (good, "good.pth")):
        code, _, err = _cli(eval_script, ["--checkpoint", str(path), "--out_dir", str(tmp_path / "e"),
                                          "--dataset", "synthetic", "--object", "ring"], capsys)
        _one_line_error(code, err, needle)
        assert "weights_only=False" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "e").exists()


def test_eval_bad_data_and_flags_are_one_line(tmp_path, tree, knn_ckpt, capsys):
    base = ["--checkpoint", str(knn_ckpt), "--quiet"]
    assert _cli(eval_script, base + ["--out_dir", str(tmp_path / "ok")], capsys)[0] == 0
    for extra, needle in ((["--img_size", "100"], "--img_size"), (["--batch_size", "0"], "--batch_size"),
                          (["--fpr_limit", "0"], "--fpr_limit")):
        code, _, err = _cli(eval_script, base + extra + ["--out_dir", str(tmp_path / "e")], capsys)
        _one_line_error(code, err, needle)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _cli(eval_script, base + ["--out_dir", str(blocker / "sub")], capsys)
    _one_line_error(code, err, "--out_dir")
    # a mask of another size and a truncated test image: both named, nothing written
    _png(str(tree / "obj" / "ground_truth" / "hole" / "000_mask.png"), np.zeros((10, 10), np.uint8))
    img = tree / "obj" / "test" / "good" / "001.png"
    img.write_bytes(img.read_bytes()[:100])
    code, _, err = _cli(eval_script, base + ["--out_dir", str(tmp_path / "e")], capsys)
    _one_line_error(code, err, "000_mask.png", "001.png")
    assert not (tmp_path / "e").exists()


def test_a_real_command_line_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", "--checkpoint", str(tmp_path / "nope.pth"), "--out_dir",
                           str(tmp_path / "e")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "nope.pth" in proc.stderr
    helptext = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120).stdout
    assert "(default: 0.001)" in helptext     # help shows every default
    assert "(default: the preset's; off in tiny" in helptext and "(default: None)\n  --no_cmi" not in helptext


# ------------------------------------------------------------------------------------------------------------
# Nothing lost, nothing silently wrong (the fault cases): a test per kind, each asserting the one line, the exit
# status and that the files existing before are byte-identical afterwards.
# ------------------------------------------------------------------------------------------------------------

def _tree_train(tree, out, *extra):
    return ["--dataset", "mvtec", "--data_root", str(tree), "--object", "obj", "--img_size", "64", "--batch_size",
            "2", "--epochs", "1", "--quiet", "--val_fraction", "0.34", "--out_dir", str(out)] + list(extra)


def _snapshot(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, p))}


@pytest.fixture
def finished(tmp_path, tree, capsys):
    out = tmp_path / "run"
    code, _, err = _cli(train_script, _tree_train(tree, out), capsys)
    assert code == 0, err
    return out


def test_a_new_run_never_replaces_or_mixes_with_a_finished_one(tmp_path, tree, finished, capsys):
    before = _snapshot(finished)
    code, _, err = _cli(train_script, _tree_train(tree, finished, "--max_steps", "1"), capsys)
    _one_line_error(code, err, "holds a run", "--resume auto", "--overwrite")
    assert _snapshot(finished) == before
    code, _, err = _cli(train_script, _tree_train(tree, finished, "--model", "knn"), capsys)
    _one_line_error(code, err, "holds a run")
    assert _snapshot(finished) == before
    # --overwrite replaces it: one run's rows only
    code, out, err = _cli(train_script, _tree_train(tree, finished, "--overwrite", "--seed", "3"), capsys)
    assert code == 0, err
    assert "removed the earlier run's" in out
    rows = [json.loads(l) for l in open(finished / "log.jsonl")]
    assert sum("memory_bank" in r for r in rows) == 1 and [r["epoch"] for r in rows if "epoch" in r] == [1]


def test_resume_refuses_another_object_root_size_or_split(tmp_path, tree, finished, capsys):
    other = tmp_path / "other_root"
    import shutil
    shutil.copytree(tree, other)
    before = _snapshot(finished)
    for argv, needle in ((["--img_size", "96"], "img_size"), (["--seed", "1"], "seed"),
                         (["--val_fraction", "0.5"], "val_fraction")):
        code, _, err = _cli(train_script, _tree_train(tree, finished, "--epochs", "2", "--resume", "auto")
                            + argv, capsys)
        _one_line_error(code, err, needle, "another run")
        assert _snapshot(finished) == before
    argv = _tree_train(other, finished, "--epochs", "2", "--resume", "auto")
    code, _, err = _cli(train_script, argv, capsys)
    _one_line_error(code, err, "data_root")
    assert _snapshot(finished) == before
    # the same data resumes
    assert _cli(train_script, _tree_train(tree, finished, "--epochs", "2", "--resume", "auto"), capsys)[0] == 0


@pytest.mark.parametrize("extra,needles", [
    (["--accum_steps", "50"], ["--accum_steps 50", "no optimizer step"]),
    (["--min_lr", "0.1", "--lr", "0.001"], ["--min_lr 0.1", "above --lr"]),
    (["--val_fraction", "0.9"], ["--val_fraction 0.9", "at least 2"]),
    (["--anomaly_source_path", "/no/such/textures"], ["/no/such/textures"]),
])
def test_flags_that_cannot_train_are_refused_before_anything_is_written(tmp_path, tree, capsys, extra, needles):
    code, _, err = _cli(train_script, _tree_train(tree, tmp_path / "o") + extra, capsys)
    _one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_last_checkpoint(tmp_path, tree, finished, capsys,
                                                                                monkeypatch):
    import errno
    import engine
    before = _snapshot(finished)

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(engine.torch, "save", full)
    code, _, err = _cli(train_script, _tree_train(tree, finished, "--epochs", "2", "--resume", "auto"), capsys)
    _one_line_error(code, err, "could not write", "No space left on device", "MiB free", "unchanged")
    after = _snapshot(finished)
    assert after["last.pth"] == before["last.pth"] and after["best_checkpoint.pth"] == before["best_checkpoint.pth"]
    assert not [f for f in os.listdir(finished) if ".tmp" in f]


_INTERRUPTIBLE = """
import os, sys, time
sys.path.insert(0, {root!r})
import engine, train
real = engine.torch.save
def slow_save(obj, f, *a, **k):
    real(obj, f, *a, **k)
    if {during_save!r}:
        print("SAVING", flush=True)
        time.sleep(60)
engine.torch.save = slow_save
if not {during_save!r}:
    real_step = train.train_one_epoch
    def announce(*a, **k):
        print("TRAINING", flush=True)
        time.sleep(60)
        return real_step(*a, **k)
    train.train_one_epoch = announce
sys.argv = ["train.py"] + {argv!r}
engine.run_cli(train.main, train.get_args_parser(), on_interrupt=train._interrupt_hint)
"""


@pytest.mark.slow
@pytest.mark.parametrize("during_save,sig,status", [(False, "SIGINT", 130), (True, "SIGINT", 130),
                                                    (True, "SIGTERM", 143)])
def test_an_interrupt_is_one_line_with_the_resume_command_and_leaves_whole_files(tmp_path, tree, finished,
                                                                                 during_save, sig, status):
    import signal
    before = _snapshot(finished)
    argv = _tree_train(tree, finished, "--epochs", "3", "--resume", "auto")
    script = tmp_path / "child.py"
    script.write_text(_INTERRUPTIBLE.format(root=ROOT, during_save=during_save, argv=argv))
    # A job started in the background by a non-interactive shell (CI, nohup ... &) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: give the child the default disposition a terminal has.
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = ""
        while "SAVING" not in line and "TRAINING" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--resume auto" in err and ("terminated" if sig == "SIGTERM" else "interrupted") in err
    assert not [f for f in os.listdir(finished) if ".tmp" in f]
    after = _snapshot(finished)
    assert after["best_checkpoint.pth"] == before["best_checkpoint.pth"]
    torch.load(finished / "last.pth", weights_only=True)                   # whole, whichever it is


def test_a_run_killed_before_its_first_checkpoint_restarts_without_duplicate_rows(tmp_path, tree, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"memory_bank": {}}\n')
    (out / "steps.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    code, _, err = _cli(train_script, _tree_train(tree, out), capsys)
    _one_line_error(code, err, "holds a run")
    code, stdout, err = _cli(train_script, _tree_train(tree, out, "--resume", "auto"), capsys)
    assert code == 0, err
    assert "never saved a checkpoint" in stdout
    rows = [json.loads(l) for l in open(out / "log.jsonl")]
    assert sum("memory_bank" in r for r in rows) == 1
    steps = [json.loads(l)["step"] for l in open(out / "steps.jsonl")]
    assert steps == sorted(set(steps))


def test_sixteen_bit_palette_and_alpha_images_read_as_they_look(tmp_path):
    import struct
    import zlib
    from datasets.transforms import read_image
    rng = np.random.default_rng(0)
    a16 = (rng.random((8, 8)) * 65535).astype(np.uint16)
    raw = b"".join(b"\x00" + a16[y].astype(">u2").tobytes() for y in range(8))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    p16 = tmp_path / "grey16.png"
    p16.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 0, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    rgb = read_image(str(p16), "RGB")
    assert rgb.dtype == np.uint8 and rgb.min() < 50 and rgb.max() > 200          # not a white image
    assert np.abs(rgb[..., 0].astype(int) - np.rint(a16 / 257.0)).max() <= 1
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for mode in ("P", "LA", "RGBA"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(base).convert(mode).save(path)
        assert read_image(str(path), "RGB").shape == (8, 8, 3)
    bad = tmp_path / "float.tiff"
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(bad)
    from datasets import DatasetError
    with pytest.raises(DatasetError, match="non-finite"):
        read_image(str(bad), "RGB")


def test_a_test_split_without_good_images_says_what_it_cannot_measure(tmp_path, tree, knn_ckpt, capsys):
    import shutil
    shutil.rmtree(tree / "obj" / "test" / "good")
    code, out, err = _cli(eval_script, ["--checkpoint", str(knn_ckpt), "--out_dir", str(tmp_path / "e"),
                                        "--quiet", "--data_root", str(tree)], capsys)
    assert code == 0, err
    assert "no good images" in out and "false-positive rate cannot be measured" in out
    assert "flags none of the good test images (there are none)" in out
    assert "nan of the good" not in out
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["notes"]


def test_good_masks_are_ignored_or_refused_and_vis_is_fresh_and_unique(tmp_path, tree, knn_ckpt, capsys):
    # an empty mask beside a good image is ignored; one that marks something is refused, naming it
    gt = tree / "obj" / "ground_truth" / "good"
    _png(str(gt / "000.png"), np.zeros((64, 64), np.uint8))
    from datasets import build_dataset
    ds = build_dataset("mvtec", str(tree), "obj", "test", 64, 0)
    assert all(r.mask is None for r in ds.records if r.label == 0)
    # (MVTec-AD-style trees never read masks of good images; MulSen-AD and MVTec 3D-AD trees can have them)
    from datasets.base import AnomalyDataset, Record
    marked = tmp_path / "marked.png"
    m = np.zeros((64, 64), np.uint8)
    m[3:9, 3:9] = 255
    _png(str(marked), m)
    img = tree / "obj" / "test" / "good" / "000.png"
    good = AnomalyDataset([Record(str(img), None, str(marked), 0, "good", "obj")], 64, 0, "test", "t")
    from datasets import DatasetError
    with pytest.raises(DatasetError, match="marks a defect on a good image"):
        good.check_files(progress=False)
    assert good[0]["mask"].sum() == 0
    # two images whose names flatten alike get two pictures; a second eval leaves no stale pictures
    for d in ("hole_1", "hole"):
        os.makedirs(tree / "obj" / "test" / d, exist_ok=True)
        os.makedirs(tree / "obj" / "ground_truth" / d, exist_ok=True)
    _png(str(tree / "obj" / "test" / "hole_1" / "0.png"), np.zeros((64, 64, 3), np.uint8))
    _png(str(tree / "obj" / "ground_truth" / "hole_1" / "0_mask.png"), m)
    _png(str(tree / "obj" / "test" / "hole" / "1_0.png"), np.zeros((64, 64, 3), np.uint8))
    _png(str(tree / "obj" / "ground_truth" / "hole" / "1_0_mask.png"), m)
    e = tmp_path / "e"
    assert _cli(eval_script, ["--checkpoint", str(knn_ckpt), "--out_dir", str(e), "--quiet", "--save_vis",
                              "--data_root", str(tree)], capsys)[0] == 0
    n_images = len(build_dataset("mvtec", str(tree), "obj", "test", 64, 0))
    assert len(os.listdir(e / "vis" / "heatmaps")) == n_images
    (e / "vis" / "heatmaps" / "stale.png").write_bytes(b"old")
    assert _cli(eval_script, ["--checkpoint", str(knn_ckpt), "--out_dir", str(e), "--quiet",
                              "--data_root", str(tree)], capsys)[0] == 0
    assert not (e / "vis").exists()


def test_eval_disk_full_names_the_file(tmp_path, knn_ckpt, capsys, monkeypatch):
    import builtins
    import errno
    real_open = builtins.open

    def full(path, mode="r", *a, **k):
        if "w" in mode and "summary.json" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", full)
    code, _, err = _cli(eval_script, ["--checkpoint", str(knn_ckpt), "--out_dir", str(tmp_path / "e"), "--quiet"],
                        capsys)
    _one_line_error(code, err, "summary.json", "No space left on device")


def test_notebook_api_inputs_and_checkpoints_get_honest_messages(tmp_path, knn_ckpt):
    from conftest import fit_random_bank
    from MambaAlign import MambaAlign, mambaalign_tiny
    model = fit_random_bank(mambaalign_tiny(aux_ch=0), 64, 64).eval()
    x = torch.randn(3, 64, 64)
    want = model.predict(x)["score_logit"]
    assert torch.allclose(model.predict(x.numpy())["score_logit"], want)
    assert torch.allclose(model.predict(x.double())["score_logit"], want, atol=1e-5)
    with pytest.raises(ValueError, match="AlignedTransform.*uint8"):
        model.predict(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="channels last"):
        model.predict(torch.randn(64, 64, 3))
    with pytest.raises(ValueError, match="non-finite"):
        model.predict(torch.full((3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 64, 64, 3))
    rnd = tmp_path / "random.pth"
    rnd.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a PyTorch checkpoint") as info:
        MambaAlign.from_checkpoint(rnd)
    assert "weights_only" not in str(info.value) and "run code" not in str(info.value)
    with pytest.raises(ValueError, match="knn"):
        MambaAlign.from_checkpoint(knn_ckpt)
    state = model.state_dict()
    del state["seg_head.weight"]
    cut = tmp_path / "cut.pth"
    torch.save({"model": state, "config": model.config.to_dict()}, cut)
    with pytest.raises(ValueError, match="seg_head.weight"):
        MambaAlign.from_checkpoint(cut)


def test_backbone_weights_that_are_text_or_a_folder_say_so(tmp_path, capsys):
    text = tmp_path / "weights.txt"
    text.write_text("hello " * 50)
    code, _, err = _cli(train_script, TRAIN + ["--backbone_weights", str(text), "--out_dir", str(tmp_path / "o")],
                        capsys)
    _one_line_error(code, err, "weights.txt", "not a PyTorch checkpoint")
    assert "'101'" not in err
    code, _, err = _cli(train_script, TRAIN + ["--backbone_weights", str(tmp_path), "--out_dir", str(tmp_path / "o")],
                        capsys)
    _one_line_error(code, err, "is a directory")


def test_random_bytes_are_never_taken_for_a_checkpoint_that_holds_code(tmp_path):
    """Bytes that are no pickle are said to be no checkpoint, whatever they begin with: a file that merely starts
    with an object-building opcode (REDUCE, OBJ, STACK_GLOBAL...) is not "holding Python objects"."""
    import random
    from engine import RunError, load_checkpoint
    rng = random.Random(0)
    path = tmp_path / "random.pth"
    for _ in range(300):
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
        with pytest.raises(RunError, match="is not a PyTorch checkpoint") as info:
            load_checkpoint(str(path))
        assert "run code" not in str(info.value)
