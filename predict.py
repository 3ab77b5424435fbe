"""Score new, unlabelled parts with a trained checkpoint, or set its decision threshold from good parts.

    python predict.py --checkpoint runs/demo/best_checkpoint.pth --input parts/rgb --aux_dir parts/xyz \\
        --out_dir runs/demo/predict --save_vis
    python predict.py --checkpoint model.onnx --input "line/2026-12-02/**/*.png" --aux_dir line/ir --out_dir today
    python predict.py --checkpoint runs/capsule/best_checkpoint.pth --calibrate_on good_parts/RGB \\
        --aux_dir good_parts/Infrared --save_checkpoint runs/capsule/line_calibrated.pth

Scoring (--input): every image under a folder (searched recursively) or matching a glob pattern is scored by the
model a checkpoint holds: a ``.pth`` from train.py (MambaAlign or the knn baseline) or an ``.onnx`` from
export.py (run by onnxruntime). The second modality comes from --aux_dir, paired by the same relative path (the
same name; another image extension is accepted, e.g. an xyz ``.tiff`` beside an RGB ``.png``). The input size,
the normalisation and how aux files are read (infrared, normals, xyz) come from the checkpoint.

Writes to --out_dir:
  predictions.csv  one row per scored image: path, aux_path, score, score_logit, decision (score_logit above the
                   stored threshold: 1 flagged, 0 passed; empty for a model without one), threshold, ms (the
                   model's time per image in its batch). Appended and flushed after every batch: a killed run
                   keeps every finished row, and --resume scores only the paths not in it yet.
  skipped.csv      path, reason: every file that could not be scored (truncated or unreadable, missing or
                   mis-sized aux, non-finite values). A bad file never stops the run.
  vis/             with --save_vis: heatmaps/ and overlays/ as eval.py draws them.
The exit status is non-zero only for bad arguments, or when no image could be scored.

Recalibration (--calibrate_on GOOD_DIR --save_checkpoint NEW.pth): scores the good parts in GOOD_DIR (at least
8 readable images, nothing but images in it), sets the decision threshold to the score that --target_fpr of them
exceed, and writes a NEW checkpoint (never the input file) that records how many images, which folder and which
quantile set it, and says how often a new good part like them would be flagged (metrics.exceedance_bounds: a
quantile of few parts flags more than --target_fpr). What the model computes is unchanged; only the decision
moves.
"""
from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datasets import DATASETS, DatasetError, dataset_class
from datasets.transforms import IMAGE_EXTENSIONS, AlignedTransform, read_image
from engine import (HelpFormatter, OnnxModel, RunError, WORKERS_HELP, autocast_context, git_revision, image_size,
                    load_checkpoint, load_model, loader_options, positive_int, prepare_out_dir, probability,
                    resolve_device, run_cli, save_atomic, vis_names, workers, write_text_atomic,
                    write_visualisation)
from metrics import exceedance_bounds, threshold_at_fpr

PREDICTION_COLUMNS = ("path", "aux_path", "score", "score_logit", "decision", "threshold", "ms")
SKIPPED_COLUMNS = ("path", "reason")
# Recalibration needs at least this many usable good images: the quantile of fewer says little.
MIN_CALIBRATION_IMAGES = 8


def get_args_parser():
    p = argparse.ArgumentParser("predict.py", add_help=True, description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="a .pth from train.py (MambaAlign or knn) or a .onnx from export.py")
    g.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                   help="how aux files are read (infrared PNG, xyz TIFF, normals PNG...) (default: the dataset "
                        "family the checkpoint was trained on)")
    g.add_argument("--img_size", type=image_size, default=None,
                   help="input size, a multiple of 32 (default: the checkpoint's training size)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (.onnx files run on the CPU)")
    g.add_argument("--use_amp", action="store_true", help="mixed precision inference (bf16 where supported)")
    g = p.add_argument_group("input")
    g.add_argument("--input", default=None,
                   help="a folder of RGB images (searched recursively), one image, or a glob pattern (quote it; "
                        "** matches folders)")
    g.add_argument("--aux_dir", default=None,
                   help="the second modality's folder, mirroring --input: each image's aux has the same relative "
                        "path and name (any image extension)")
    g.add_argument("--aux_sibling", default=None, metavar="FOLDER",
                   help="the aux files lie beside the images instead: the image path's last folder named 'rgb' "
                        "becomes FOLDER (MVTec 3D-AD trees: --aux_sibling xyz pairs <defect>/rgb/000.png with "
                        "<defect>/xyz/000.tiff)")
    g.add_argument("--rgb_only", action="store_true",
                   help="score from RGB alone: a model trained with aux runs with its aux branch and bank signal "
                        "off (what modality dropout trains for)")
    g.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass")
    g.add_argument("--workers", "--num_workers", dest="num_workers", type=workers, default="auto", help=WORKERS_HELP)
    g = p.add_argument_group("output")
    g.add_argument("--out_dir", default=None, help="folder for predictions.csv, skipped.csv and vis/")
    g.add_argument("--resume", action="store_true",
                   help="continue into an --out_dir that holds a predictions.csv: score only the paths not in it")
    g.add_argument("--save_vis", action="store_true", help="write a heatmap and an overlay per scored image")
    g = p.add_argument_group("recalibration")
    g.add_argument("--calibrate_on", default=None, metavar="GOOD_DIR",
                   help="a folder of good parts from the line (with --aux_dir for their aux): set the decision "
                        "threshold from their scores and write --save_checkpoint")
    g.add_argument("--save_checkpoint", default=None, metavar="NEW.pth",
                   help="where the recalibrated checkpoint goes (a new file; the input checkpoint is never "
                        "overwritten)")
    g.add_argument("--target_fpr", type=probability, default=0.05,
                   help="recalibration: the share of the good parts that may score above the threshold")
    g.add_argument("--min_images", type=positive_int, default=MIN_CALIBRATION_IMAGES,
                   help="recalibration: refuse fewer usable good images than this (a quantile of a handful is "
                        "coarse: lower it only knowingly)")
    g = p.add_argument_group("run")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------

def list_inputs(spec: str) -> Tuple[str, List[str], List[str]]:
    """(root, image paths, other files) of --input: a folder searched recursively, one file, or a glob pattern.
    Paths are root-relative-sortable strings as found; hidden files are ignored."""
    if os.path.isdir(spec):
        root, found = spec, []
        for dirpath, dirs, files in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in files if not f.startswith(".")]
    elif glob.has_magic(spec):
        found = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
        magic = next(i for i, part in enumerate(spec.split(os.sep)) if glob.has_magic(part))
        root = os.sep.join(spec.split(os.sep)[:magic]) or "."
    elif os.path.isfile(spec):
        root, found = os.path.dirname(spec) or ".", [spec]
    else:
        raise RunError(f"--input {spec}: no such folder, file or pattern")
    images = sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS))
    others = sorted(f for f in found if not f.lower().endswith(IMAGE_EXTENSIONS))
    return root, images, others


def find_aux(aux_dir: Optional[str], root: str, path: str, sibling: Optional[str] = None) -> Optional[str]:
    """The aux file of ``path`` (under ``root``): the same relative path under ``aux_dir`` or, with ``sibling``,
    the path with its last 'rgb' folder renamed; the same extension first, then any image extension; None where
    there is none."""
    if sibling:
        parts = os.path.normpath(path).split(os.sep)
        if "rgb" not in parts:
            return None
        k = len(parts) - 1 - parts[::-1].index("rgb")
        stem, ext = os.path.splitext(os.sep.join(parts[:k] + [sibling] + parts[k + 1:]))
    else:
        stem, ext = os.path.splitext(os.path.join(aux_dir, os.path.relpath(path, root)))
    for e in (ext,) + tuple(x for x in IMAGE_EXTENSIONS if x != ext.lower()):
        if os.path.isfile(stem + e):
            return stem + e
    return None


class PartFiles(Dataset):
    """The files to score, read and transformed as the checkpoint's training data were. An item is the sample
    dict (rgb, aux, path, aux_path) or, for a file that cannot be used, {"path", "error"}: a bad file is data
    here, never an exception, so one file cannot stop a run (nor a DataLoader worker)."""

    def __init__(self, items: List[Tuple[str, Optional[str]]], spec: Dict[str, object], use_aux: bool):
        self.items, self.spec, self.use_aux = items, spec, use_aux
        self.transform = AlignedTransform(spec["img_size"], spec["aux_kind"] if use_aux else None)
        self.reader = dataset_class(spec["dataset"]) if use_aux else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, object]:
        path, aux_path = self.items[i]
        try:
            return self._load(path, aux_path)
        except (DatasetError, OSError, ValueError) as exc:
            return {"path": path, "error": " ".join(str(exc).split()) or type(exc).__name__}

    def _load(self, path, aux_path):
        rgb = read_image(path, "RGB")
        aux = valid = None
        if self.use_aux:
            if aux_path is None:
                raise DatasetError("no aux file for it (the same relative path and name under --aux_dir, or the "
                                   "--aux_sibling folder beside its rgb folder)")
            aux, valid = self.reader.read_aux(aux_path, self.spec["aux_ch"])
            if aux.shape[2] != self.spec["aux_ch"]:
                raise DatasetError(f"aux {aux_path} gives {aux.shape[2]} channels, the model takes "
                                   f"{self.spec['aux_ch']}")
            if self.reader.aux_matches_rgb and aux.shape[:2] != rgb.shape[:2]:
                raise DatasetError(f"aux {aux_path} is {aux.shape[1]}x{aux.shape[0]} but the image is "
                                   f"{rgb.shape[1]}x{rgb.shape[0]}; they must have the same size")
            bad = ~np.isfinite(aux)
            if valid is not None:
                bad &= valid[..., None]
            if bad.any():
                raise DatasetError(f"aux {aux_path} holds {int(bad.sum())} non-finite value(s) (NaN or inf)")
        out = self.transform(rgb, aux, None, valid)
        out.pop("mask", None)
        out.pop("valid", None)
        if not all(torch.isfinite(v).all() for v in out.values()):
            raise DatasetError("non-finite values after preprocessing")
        out.update(path=path, aux_path=aux_path or "")
        return out


def collate(items):
    """(batch of the good samples or None, [(path, reason)] of the bad ones)."""
    good = [s for s in items if "error" not in s]
    bad = [(s["path"], s["error"]) for s in items if "error" in s]
    if not good:
        return None, bad
    batch = {"rgb": torch.stack([s["rgb"] for s in good]), "path": [s["path"] for s in good],
             "aux_path": [s["aux_path"] for s in good]}
    if "aux" in good[0]:
        batch["aux"] = torch.stack([s["aux"] for s in good])
    return batch, bad


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------

def load_scorer(args, device) -> Tuple[object, Dict[str, object], Optional[dict]]:
    """(model: called as model(rgb, aux) -> output dict, its input spec, the loaded .pth checkpoint or None)."""
    if args.checkpoint.lower().endswith(".onnx"):
        model = OnnxModel(args.checkpoint)
        spec, ckpt = dict(model.spec), None
    else:
        ckpt = load_checkpoint(args.checkpoint)
        model = load_model(ckpt, source=args.checkpoint).to(device)
        train_args = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
        spec = {"img_size": train_args.get("img_size"), "dataset": train_args.get("dataset"),
                "aux_ch": int(model.config.aux_ch), "model_type": getattr(model, "model_type", "mambaalign")}
    spec["img_size"] = args.img_size or spec.get("img_size")
    spec["dataset"] = args.dataset or spec.get("dataset")
    if not spec["img_size"]:
        raise RunError(f"{args.checkpoint} does not record its input size: pass --img_size")
    if spec["aux_ch"] and not args.rgb_only:
        if not spec["dataset"]:
            raise RunError(f"{args.checkpoint} does not record how its aux files are read: pass --dataset")
        spec["aux_kind"] = dataset_class(spec["dataset"]).aux_kind_for(spec["aux_ch"])
    else:
        spec["aux_kind"] = None
    spec["threshold"] = float(getattr(model, "threshold", float("nan")))
    return model, spec, ckpt


@torch.no_grad()
def score_batch(model, batch, device, amp: bool) -> Dict[str, np.ndarray]:
    rgb = batch["rgb"].to(device)
    aux = batch["aux"].to(device) if "aux" in batch else None
    with autocast_context(device, amp):
        out = model(rgb, aux)
    return {"anomaly_map": out["anomaly_map"][:, 0].float().cpu().numpy(),
            "score": out["score"].float().cpu().numpy(), "score_logit": out["score_logit"].float().cpu().numpy()}


def make_items(args, images: List[str], root: str, use_aux: bool) -> List[Tuple[str, Optional[str]]]:
    return [(p, find_aux(args.aux_dir, root, p, args.aux_sibling) if use_aux else None) for p in images]


def check_args(args, spec) -> bool:
    """Argument checks that need the model; returns whether aux files are read."""
    use_aux = bool(spec["aux_ch"]) and not args.rgb_only
    if use_aux and not (args.aux_dir or args.aux_sibling):
        raise RunError(f"the model takes a second modality ({spec['aux_kind']}): pass --aux_dir (or --aux_sibling) "
                       f"with its files, or --rgb_only to score from RGB alone")
    if args.aux_dir and args.aux_sibling:
        raise RunError("--aux_dir and --aux_sibling are two ways to find the aux files: pass one")
    if args.aux_dir and not os.path.isdir(args.aux_dir):
        raise RunError(f"--aux_dir {args.aux_dir}: folder not found")
    if args.rgb_only and spec.get("onnx") and spec["aux_ch"]:
        raise RunError(f"{args.checkpoint} was exported with an aux input; export an RGB-only model "
                       f"(train.py --aux_ch 0) to score from RGB alone through ONNX")
    return use_aux


# --------------------------------------------------------------------------------------------------------
# Scoring a folder
# --------------------------------------------------------------------------------------------------------

def _done_paths(path: str) -> List[str]:
    """Paths already in predictions.csv; a last row cut short by a kill is dropped (the file is rewritten)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as fh:
        text = fh.read()
    lines = text.splitlines(keepends=True)
    rows = list(csv.reader(lines))
    if not rows or tuple(rows[0]) != PREDICTION_COLUMNS:
        raise RunError(f"--resume: {path} is not a predictions.csv this version wrote (header {rows[:1]})")
    complete = [i for i, (line, row) in enumerate(zip(lines, rows))
                if i > 0 and line.endswith("\n") and len(row) == len(PREDICTION_COLUMNS)]
    if len(complete) != len(rows) - 1:
        write_text_atomic(path, "".join([lines[0]] + [lines[i] for i in complete]))
    return [rows[i][0] for i in complete]


def _inputs(args, spec: str):
    """list_inputs, and with --aux_sibling only the images inside a folder named rgb (an MVTec 3D-AD tree also
    holds xyz TIFFs and gt masks, which are not parts to score)."""
    root, images, others = list_inputs(spec)
    if args.aux_sibling:
        images = [p for p in images if "rgb" in os.path.normpath(p).split(os.sep)[:-1]]
    return root, images, others


def run_scoring(args, model, spec, device, use_aux) -> Dict[str, object]:
    from tqdm import tqdm
    root, images, others = _inputs(args, args.input)
    if not images:
        raise RunError(f"--input {args.input}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if not args.out_dir:
        raise RunError("--out_dir is required to score --input")
    pred_path = os.path.join(args.out_dir, "predictions.csv")
    skip_path = os.path.join(args.out_dir, "skipped.csv")
    if os.path.isfile(pred_path) and not args.resume:
        raise RunError(f"--out_dir {args.out_dir} already holds predictions.csv: pass --resume to continue it, or "
                       f"choose a new folder")
    done = set(_done_paths(pred_path)) if args.resume else set()
    todo = [p for p in images if p not in done]
    prepare_out_dir(args.out_dir)
    print(f"MambaAlign predict | git {git_revision()} | {spec['model_type']} from {args.checkpoint} | device "
          f"{device} | {len(images)} images under {root}"
          + (f", {len(done)} already in predictions.csv, {len(todo)} to score" if args.resume else "")
          + (f"; {len(others)} non-image file(s) ignored" if others else ""))
    if use_aux is False and spec["aux_ch"]:
        print("scoring from RGB alone (--rgb_only): the aux branch and its bank signal are off")
    names = dict(zip(images, vis_names(images))) if args.save_vis else {}
    loader = DataLoader(PartFiles(make_items(args, todo, root, use_aux), spec, use_aux), batch_size=args.batch_size,
                        collate_fn=collate, **loader_options(args, device))
    threshold = spec["threshold"]
    fresh = not os.path.isfile(pred_path)
    n_scored, n_flagged, skipped, latencies = 0, 0, [], []
    t0 = time.time()
    with open(pred_path, "a", newline="") as pf, open(skip_path, "w", newline="") as sf:
        pw, sw = csv.writer(pf), csv.writer(sf)
        if fresh:
            pw.writerow(PREDICTION_COLUMNS)
        sw.writerow(SKIPPED_COLUMNS)
        for batch, bad in tqdm(loader, desc="predict", disable=args.quiet or len(todo) <= args.batch_size):
            for path, reason in bad:
                sw.writerow([path, reason])
                skipped.append((path, reason))
            sf.flush()
            if batch is None:
                continue
            t_b = time.perf_counter()
            out = score_batch(model, batch, device, args.use_amp)
            ms = 1e3 * (time.perf_counter() - t_b) / len(batch["path"])
            for i, path in enumerate(batch["path"]):
                logit = float(out["score_logit"][i])
                if not math.isfinite(logit):      # never a decision from a non-finite score
                    reason = f"the model gave a non-finite score ({logit})"
                    sw.writerow([path, reason])
                    skipped.append((path, reason))
                    continue
                decision = "" if not math.isfinite(threshold) else int(logit > threshold)
                n_flagged += decision == 1
                pw.writerow([path, batch["aux_path"][i], f"{out['score'][i]:.6f}", f"{logit:.6f}", decision,
                             "" if not math.isfinite(threshold) else f"{threshold:.6f}", f"{ms:.1f}"])
                latencies.append(ms)
                n_scored += 1
                if args.save_vis:
                    write_visualisation(args.out_dir, names[path], out["anomaly_map"][i], batch["rgb"][i],
                                        batch["aux"][i] if "aux" in batch else None)
            pf.flush()
            sf.flush()
    wall = time.time() - t0
    summary = {"scored": n_scored, "flagged": n_flagged, "skipped": len(skipped), "already_done": len(done),
               "images_per_s": n_scored / wall if wall > 0 else float("nan"),
               "p50_ms": float(np.percentile(latencies, 50)) if latencies else float("nan"),
               "p95_ms": float(np.percentile(latencies, 95)) if latencies else float("nan")}
    thr = f"the stored threshold {threshold:.4f}" if math.isfinite(threshold) else "no stored threshold"
    print(f"scored {n_scored} image(s), flagged {n_flagged} ({thr}), skipped {len(skipped)}"
          + (f" (reasons in {skip_path})" if skipped else "")
          + f"; {summary['images_per_s']:.1f} images/s, model latency p50 {summary['p50_ms']:.1f} ms, "
            f"p95 {summary['p95_ms']:.1f} ms per image")
    for path, reason in skipped[:5]:
        print(f"  skipped {path}: {reason}")
    if len(skipped) > 5:
        print(f"  ... and {len(skipped) - 5} more in {skip_path}")
    print(f"wrote {pred_path}" + (f", {os.path.join(args.out_dir, 'vis')}/" if args.save_vis else ""))
    if n_scored == 0 and not done:
        raise RunError(f"no image could be scored ({len(skipped)} skipped: see {skip_path})")
    return summary


# --------------------------------------------------------------------------------------------------------
# Recalibration
# --------------------------------------------------------------------------------------------------------

def run_calibration(args, model, spec, ckpt, device, use_aux) -> Dict[str, object]:
    if ckpt is None:
        raise RunError("--calibrate_on needs a .pth checkpoint: recalibrate it, then export the new checkpoint")
    if not args.save_checkpoint:
        raise RunError("--calibrate_on needs --save_checkpoint NEW.pth (the input checkpoint is never overwritten)")
    target = args.save_checkpoint
    if os.path.exists(target) and os.path.samefile(target, args.checkpoint):
        raise RunError(f"--save_checkpoint {target} is the input checkpoint; write the recalibrated one to a new file")
    if os.path.exists(target):
        raise RunError(f"--save_checkpoint {target} already exists; choose a new file name")
    if not os.path.isdir(args.calibrate_on):
        raise RunError(f"--calibrate_on {args.calibrate_on}: folder not found")
    root, images, others = _inputs(args, args.calibrate_on)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise RunError(f"--calibrate_on {args.calibrate_on} holds {len(others)} file(s) that are not images "
                       f"({shown}): point it at a folder of good parts' images only")
    from tqdm import tqdm
    loader = DataLoader(PartFiles(make_items(args, images, root, use_aux), spec, use_aux),
                        batch_size=args.batch_size, collate_fn=collate, **loader_options(args, device))
    scores, skipped = [], []
    for batch, bad in tqdm(loader, desc="calibrate", disable=args.quiet):
        skipped += bad
        if batch is not None:
            scores += [float(s) for s in score_batch(model, batch, device, args.use_amp)["score_logit"]]
    finite = [s for s in scores if math.isfinite(s)]
    if len(finite) < max(2, args.min_images):
        why = f"; {len(skipped)} could not be used (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise RunError(f"--calibrate_on {args.calibrate_on}: {len(finite)} usable good image(s), at least "
                       f"{max(2, args.min_images)} are needed for a threshold (--min_images){why}; nothing written")
    old = spec["threshold"]
    new = float(torch.tensor(threshold_at_fpr(finite, args.target_fpr), dtype=torch.float32))   # as stored
    ckpt = dict(ckpt)
    state = dict(ckpt["model"])
    state["threshold"] = torch.tensor(new)
    ckpt["model"] = state
    record = {"images": len(finite), "skipped": len(skipped), "folder": os.path.abspath(args.calibrate_on),
              "aux_dir": (os.path.abspath(args.aux_dir) if args.aux_dir else f"sibling {args.aux_sibling}")
              if use_aux else None, "target_fpr": args.target_fpr,
              "quantile": 1.0 - args.target_fpr, "threshold": new,
              "new_good_flagged": list(exceedance_bounds(finite, new)),
              "previous_threshold": old if math.isfinite(old) else None,
              "source_checkpoint": os.path.abspath(args.checkpoint), "git": git_revision()}
    ckpt["calibration"] = record
    load_model(ckpt, source=target)            # the new file must load as the old one did
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    save_atomic(ckpt, target)
    above = sum(s > new for s in finite)
    prev = f"{old:.4f}" if math.isfinite(old) else "none"
    print(f"recalibrated on {len(finite)} good image(s) from {args.calibrate_on}"
          + (f" ({len(skipped)} unreadable, left out)" if skipped else "")
          + f": threshold {prev} -> {new:.4f} (the {1 - args.target_fpr:.3f} quantile of their score_logit; "
            f"{above} of them score above it)")
    lo, hi = record["new_good_flagged"]
    print(f"a new good part like these scores above it with a probability of {lo:.3f} to {hi:.3f} (target "
          f"{args.target_fpr:.3f}; a quantile of {len(finite)} scores: more good parts bring it closer)")
    print(f"wrote {target}")
    return record


def main(args):
    device = resolve_device(args.device)
    if args.calibrate_on is None and args.input is None:
        raise RunError("pass --input (images to score) or --calibrate_on (good parts to set the threshold from)")
    if args.calibrate_on is not None and args.input is not None:
        raise RunError("--input and --calibrate_on are two runs: score, or recalibrate, not both at once")
    model, spec, ckpt = load_scorer(args, device)
    if spec.get("onnx"):
        device = torch.device("cpu")
    use_aux = check_args(args, spec)
    if args.calibrate_on is not None:
        return run_calibration(args, model, spec, ckpt, device, use_aux)
    return run_scoring(args, model, spec, device, use_aux)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
