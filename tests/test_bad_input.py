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
from engine import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(script, argv, capsys):
    """Run a script's command line in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        run_cli(script.main, script.get_args_parser(), argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


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
