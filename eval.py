"""Evaluate a MambaAlign checkpoint on the test split: metrics, per-image CSV, summaries, visualisations.

    python eval.py --dataset synthetic --object disc --checkpoint runs/demo/best_checkpoint.pth --out_dir runs/demo/eval --save_vis
    python eval.py --data_root /path/to/MulSen_AD --dataset mulsenad --objects all \\
        --checkpoint "runs/mulsen_{object}/best_checkpoint.pth" --out_dir results/mulsen

Writes to --out_dir: eval_results.csv (one row per test image: path, object, defect, label, score, score_logit,
decision, pixel_auroc), summary.json and summary.txt (every metric overall, per defect type, per object and the
mean over objects; the stored decision threshold's error rates per object) and, with --save_vis, vis/heatmaps/
and vis/overlays/ (one PNG per test image).

Scores are the model's own (``score`` = sigmoid(score_logit), no normalisation over the test set); metrics rank
by score_logit (the same order, without sigmoid saturation). Per-defect metrics use the good test images plus that
defect's images. F1-max values use the best threshold on the test set itself: an oracle. ``decision`` uses the
threshold stored in the checkpoint (chosen by train.py on held-out TRAIN normals at --target_fpr): what a line
would see; empty for models without one.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

import metrics
from datasets import DATASETS, ShiftedAux, build_dataset, list_objects
from engine import (HelpFormatter, RunError, fpr_limit, git_revision, image_size, load_checkpoint, load_model,
                    positive_int, prepare_out_dir, resolve_device, run_cli, run_inference, vis_names, workers,
                    write_text_atomic, write_visualisation, WORKERS_HELP, loader_options)

CSV_COLUMNS = ("path", "object", "defect", "label", "score", "score_logit", "decision", "pixel_auroc",
               "cloud_score", "fused_score_logit")


def get_args_parser():
    p = argparse.ArgumentParser("eval.py", add_help=True, description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                   help="dataset family (default: the one the checkpoint was trained on)")
    g.add_argument("--data_root", default=None, help="root folder of the dataset tree (not needed for synthetic)")
    g.add_argument("--object", default=None, help="object/class to evaluate (default: the checkpoint's)")
    g.add_argument("--objects", default=None,
                   help="comma-separated objects, or 'all' (overrides --object); use {object} in --checkpoint "
                        "for one checkpoint per object")
    g.add_argument("--img_size", type=image_size, default=None,
                   help="input size, a multiple of 32 (default: each checkpoint's training size)")
    g.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass")
    g.add_argument("--workers", "--num_workers", dest="num_workers", type=workers, default="auto",
                   help=WORKERS_HELP)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="checkpoint from train.py (or a raw state dict with --config); may contain {object}")
    g.add_argument("--config", default=None,
                   help="JSON file with the MambaAlignConfig fields, for raw state dicts without a config")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--use_amp", action="store_true", help="mixed precision inference (bf16 where supported)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--fpr_limit", type=fpr_limit, default=0.3,
                   help="FPR integration limit of the 'aupro' key (MVTec: 0.3); aupro_0.1/0.05/0.01 are always "
                        "reported beside it")
    g.add_argument("--aux_shift", type=float, default=0.0,
                   help="robustness study: shift aux right by this many pixels before the model sees it")
    g.add_argument("--out_dir", required=True, help="folder for eval_results.csv, summary.{txt,json} and vis/")
    g.add_argument("--save_vis", action="store_true", help="write a heatmap and an overlay per test image")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show the traceback of a data or checkpoint error")
    return p


def save_visualisations(res: Dict, out_dir: str, names: Dict[str, str]) -> int:
    """vis/heatmaps/<name>.png and vis/overlays/<name>.png per test image (``engine.write_visualisation``); names:
    {path: file name}, unique over every evaluated object (``engine.vis_names``)."""
    for i, path in enumerate(res["path"]):
        write_visualisation(out_dir, names[path], res["maps"][i], res["rgb"][i],
                            res["aux"][i] if res.get("aux") is not None else None, res["masks"][i])
    return len(res["path"])


def _per_image_pixel_auroc(maps, masks) -> List[float]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for m, g in zip(maps, masks):
            out.append(metrics.pixel_auroc(m, g) if 0 < g.sum() < g.size else float("nan"))
    return out


# At most this many subsets' metrics at once: each holds its pooled pixels' sort keys and rankings (about 40 bytes
# per pixel; a subset of a multi-object MVTec 3D-AD evaluation can have tens of millions of pixels).
METRIC_THREADS = 4


def _metrics_of_subsets(res: Dict, subsets: Dict[tuple, np.ndarray], fpr_limit: float) -> Dict[tuple, Dict]:
    """{key: metrics.compute_metrics of the images ``subsets[key]``}, several subsets at once (up to torch's
    thread count, at most METRIC_THREADS): their work is numpy's sorts and passes over the pooled pixels, which
    release the GIL, where one subset at a time kept a core idle (capsule's seven subsets of 58 maps at 256 px:
    0.26 against 0.37-0.40 s on 2 cores with the scripts' malloc settings, a process's first summary 0.62-0.65
    against 0.71-0.87 s, the same numbers; the threads allocate from the main heap: engine.keep_freed_memory).
    Degenerate subsets give NaN, reported as such: their warnings are silenced once around all threads
    (``warnings.catch_warnings`` is not thread-safe)."""
    one = lambda idx: metrics.compute_metrics(res["score_logit"][idx], res["label"][idx], res["maps"][idx],
                                              res["masks"][idx], fpr_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with ThreadPoolExecutor(max(1, min(len(subsets), torch.get_num_threads(), METRIC_THREADS))) as pool:
            return dict(zip(subsets, pool.map(one, subsets.values())))


def summarise(res: Dict, fpr_limit: float) -> Dict[str, object]:
    """Metrics overall, per defect type (good images + that defect), per object, and the mean over objects."""
    objects = np.asarray(res["object"])
    defects = np.asarray(res["defect"])
    good = defects == "good"
    subsets = {("overall",): np.arange(len(objects))}
    subsets.update({("per_defect", d): np.nonzero(good | (defects == d))[0] for d in sorted(set(defects) - {"good"})})
    per_object = {o: np.nonzero(objects == o)[0] for o in sorted(set(objects))}
    # one object (a class's test split): its row is the overall one, not computed twice
    subsets.update({("per_object", o): idx for o, idx in per_object.items() if len(idx) < len(objects)})
    computed = _metrics_of_subsets(res, subsets, fpr_limit)
    overall = computed[("overall",)]
    summary: Dict[str, object] = {
        "overall": overall,
        "per_defect": {key[1]: v for key, v in computed.items() if key[0] == "per_defect"},
        "per_object": {o: computed[("per_object", o)] if ("per_object", o) in computed else dict(overall)
                       for o in per_object}}
    summary["mean_over_objects"] = {k: metrics.nanmean(v[k] for v in summary["per_object"].values())
                                    for k in metrics.METRIC_KEYS}
    summary["counts"] = {"images": int(len(objects)), "anomalous": int(res["label"].sum()),
                         "with_mask": int(sum(m.any() for m in res["masks"])),
                         "left_out_of_pixel_metrics": summary["overall"]["pixel_images_excluded"]}
    return summary


def _decision_rates(res: Dict) -> Dict[str, object]:
    """The stored threshold and the share of good / anomalous test images it flags (None without a threshold)."""
    if not math.isfinite(res["threshold"]):
        return {"threshold": None, "test_fpr": None, "test_tpr": None}
    good, bad = res["label"] == 0, res["label"] == 1
    rate = lambda m: float(res["decision"][m].mean()) if m.any() else float("nan")
    return {"threshold": res["threshold"], "test_fpr": rate(good), "test_tpr": rate(bad)}


def score_clouds(model, dataset, paths: List[str], vis_dir, names: Dict[str, str], quiet: bool = False
                 ) -> np.ndarray:
    """(N,) the standardised object score of each test part's point cloud (NaN where it has none, or the
    checkpoint no point-cloud bank); with ``vis_dir`` the per-point scores as vis/clouds/<name>.ply. A cloud that
    cannot be read is said once and left out (the part scores from its images alone)."""
    out = np.full(len(paths), np.nan)
    bank = getattr(model, "cloud_bank", None)
    records = {r.rgb: r for r in getattr(dataset, "base", dataset).records}
    clouds = [records[p].cloud if p in records else None for p in paths]
    if bank is None or not any(clouds):
        return out
    from tqdm import tqdm
    from datasets import DatasetError
    from pointcloud import read_points, write_ply_scores
    bad = []
    for i, c in enumerate(tqdm(clouds, desc="point clouds", leave=False, disable=quiet)):
        if not c:
            continue
        try:
            pts = read_points(c)
        except DatasetError as exc:
            bad.append(str(exc))
            continue
        per_point = bank.point_scores(pts)
        out[i] = bank.standardise(float(per_point.max()))
        if vis_dir:
            folder = os.path.join(vis_dir, "vis", "clouds")
            os.makedirs(folder, exist_ok=True)
            write_ply_scores(os.path.join(folder, os.path.splitext(names[paths[i]])[0] + ".ply"), pts, per_point)
    if bad:
        print(f"{len(bad)} point cloud(s) could not be read, their parts score from the images alone: {bad[0]}"
              + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    missing = sum(not c for c in clouds)
    if missing:
        print(f"{missing} test part(s) have no point cloud: they score from the images alone")
    return out


def _cloud_summary(res: Dict) -> Dict[str, object]:
    """Image metrics of the fused score (images + point clouds) and of the clouds alone on the parts that have
    one; counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fused = metrics.compute_metrics(res["fused"], res["label"])
        has = np.isfinite(res["cloud_score"])
        alone = metrics.image_auroc(res["cloud_score"][has], res["label"][has]) if has.any() else float("nan")
    return {"image_auroc": fused["image_auroc"], "image_ap": fused["image_ap"],
            "image_f1_max": fused["image_f1_max"], "clouds_alone_auroc": alone, "parts": int(len(has)),
            "parts_with_cloud": int(has.sum()),
            "score": "score_logit + the point cloud's standardised object score (pointcloud.PointCloudBank)"}


def class_notes(res: Dict) -> List[str]:
    """What a test split without good (or without anomalous) images cannot measure, and why (the table shows
    those metrics as nan)."""
    labels = np.asarray(res["label"])
    notes = []
    if not (labels == 0).any():
        notes.append("the test split has no good images: image AUROC, AP, F1-max and pixel AUROC/AUPRO need both "
                     "classes (nan), and the threshold's false-positive rate cannot be measured")
    if not (labels == 1).any():
        notes.append("the test split has no anomalous images: image AUROC, AP, F1-max and every pixel metric need "
                     "both classes (nan); only the threshold's false-positive rate on good parts is measured")
    return notes


def format_table(summary: Dict[str, object]) -> str:
    keys = metrics.METRIC_KEYS
    rows = [("overall", summary["overall"]), ("mean over objects", summary["mean_over_objects"])]
    rows += [(f"object {o}", v) for o, v in summary["per_object"].items()]
    rows += [(f"defect {d}", v) for d, v in summary["per_defect"].items()]
    width = max(len(r[0]) for r in rows)
    fmt = lambda x: "  nan " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.4f}"
    lines = [" " * width + " | " + " | ".join(f"{k:>12}" for k in keys)]
    lines.append("-" * len(lines[0]))
    for name, v in rows:
        lines.append(f"{name:<{width}} | " + " | ".join(f"{fmt(v[k]):>12}" for k in keys))
    return "\n".join(lines)


def _load_model(path: str, config_path):
    """(model in eval mode on the CPU, the training args saved in the checkpoint or {})."""
    config = None
    if config_path:
        try:
            with open(config_path) as fh:
                config = json.load(fh)
        except (OSError, ValueError) as exc:
            raise RunError(f"--config {config_path}: not a readable JSON file ({exc})") from None
    ckpt = load_checkpoint(path)
    model = load_model(ckpt, config=config, source=path)
    train_args = ckpt.get("args", {}) if isinstance(ckpt, dict) and "model" in ckpt else {}
    if isinstance(ckpt, dict) and ckpt.get("pointcloud") is not None:
        from pointcloud import PointCloudBank
        model.cloud_bank = PointCloudBank.from_state(ckpt["pointcloud"])
    return model, train_args


def _plan(args) -> Tuple[str, List[Dict]]:
    """Every object's model (read once, kept on the CPU), settings and test dataset, checked before anything is
    written. With {object} in --checkpoint each object is evaluated at the size and data seed its own checkpoint
    was trained with."""
    template = "{object}" in args.checkpoint
    first_model, first_args = (None, {}) if template else _load_model(args.checkpoint, args.config)
    dataset = args.dataset or first_args.get("dataset")
    if dataset is None:
        raise RunError("--dataset is required: " + ("with {object} in --checkpoint the dataset is read per object "
                                                   "only after the objects are known" if template else
                                                   "the checkpoint does not say which dataset it was trained on"))
    data_root = args.data_root if args.data_root is not None else first_args.get("data_root")
    if args.objects:
        objects = list_objects(dataset, data_root) if args.objects == "all" else args.objects.split(",")
    else:
        obj = args.object or first_args.get("object")
        if obj is None:
            raise RunError("--object (or --objects) is required: the checkpoint does not name its object")
        objects = [obj]
    plan = []
    for obj in objects:
        path = args.checkpoint.replace("{object}", obj)
        model, train_args = (first_model, first_args) if not template else _load_model(path, args.config)
        img_size = args.img_size or train_args.get("img_size") or 256
        root = data_root if data_root is not None else train_args.get("data_root")
        kw = {"seed": train_args.get("data_seed", 0)} if dataset == "synthetic" else {}
        ds = build_dataset(dataset, root, obj, "test", img_size, model.config.aux_ch, progress=not args.quiet, **kw)
        if args.aux_shift:
            ds = ShiftedAux(ds, args.aux_shift)
        plan.append({"object": obj, "checkpoint": path, "model": model, "img_size": img_size, "dataset": ds})
    return dataset, plan


def main(args) -> Dict[str, object]:
    device = resolve_device(args.device)
    t0 = time.time()
    print(f"MambaAlign eval | git {git_revision()} | device {device}")
    dataset, plan = _plan(args)
    objects = [p["object"] for p in plan]
    sizes = sorted({p["img_size"] for p in plan})
    img_size = sizes[0] if len(sizes) == 1 else {p["object"]: p["img_size"] for p in plan}
    prepare_out_dir(args.out_dir)
    old_vis = os.path.join(args.out_dir, "vis")
    if os.path.isdir(old_vis):       # never leave an earlier evaluation's pictures beside this one's summary
        shutil.rmtree(old_vis)
        print(f"removed {old_vis}: the pictures of an earlier evaluation into this folder")
    results: List[Dict] = []
    paths = [r.rgb for p in plan for r in getattr(p["dataset"], "base", p["dataset"]).records]
    names = dict(zip(paths, vis_names(paths)))
    for p in plan:
        model = p["model"].to(device)          # one model on the device at a time
        loader = DataLoader(p["dataset"], batch_size=args.batch_size, shuffle=False,
                            **loader_options(args, device))
        res = run_inference(model, loader, device, amp=args.use_amp, progress=not args.quiet,
                            desc=f"test {p['object']}", keep_inputs=args.save_vis)
        model.cpu()
        threshold = float(getattr(model, "threshold", float("nan")))
        res["decision"] = np.where(res["score_logit"] > threshold, 1.0, 0.0) if math.isfinite(threshold) \
            else np.full(len(res["score_logit"]), np.nan)
        res["threshold"] = threshold
        res["cloud_score"] = score_clouds(model, p["dataset"], res["path"], args.out_dir if args.save_vis else None,
                                          names, quiet=args.quiet)
        if args.save_vis:
            save_visualisations(res, args.out_dir, names)
        results.append(res)
    merged = {k: np.concatenate([r[k] for r in results])
              for k in ("score", "score_logit", "decision", "label", "maps", "masks", "cloud_score")}
    # Images + point clouds: the image score plus the cloud's standardised object score (0 where a part has none)
    merged["fused"] = merged["score_logit"] + np.nan_to_num(merged["cloud_score"], nan=0.0)
    for k in ("path", "defect", "object"):
        merged[k] = [x for r in results for x in r[k]]
    per_image = _per_image_pixel_auroc(merged["maps"], merged["masks"])
    has_clouds = bool(np.isfinite(merged["cloud_score"]).any())
    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(CSV_COLUMNS)
    for i in range(len(merged["path"])):
        cloud = merged["cloud_score"][i]
        w.writerow([merged["path"][i], merged["object"][i], merged["defect"][i], int(merged["label"][i]),
                    f"{merged['score'][i]:.6f}", f"{merged['score_logit'][i]:.6f}",
                    "" if math.isnan(merged["decision"][i]) else int(merged["decision"][i]),
                    "" if math.isnan(per_image[i]) else f"{per_image[i]:.6f}",
                    "" if math.isnan(cloud) else f"{cloud:.6f}",
                    "" if not has_clouds else f"{merged['fused'][i]:.6f}"])
    write_text_atomic(os.path.join(args.out_dir, "eval_results.csv"), rows.getvalue())
    summary = summarise(merged, args.fpr_limit)
    summary["decision"] = {p["object"]: _decision_rates(r) for p, r in zip(plan, results)}
    summary["settings"] = {"checkpoint": args.checkpoint, "dataset": dataset, "objects": objects,
                           "img_size": img_size, "fpr_limit": args.fpr_limit, "aux_shift": args.aux_shift,
                           "git": git_revision(), "model": getattr(model, "model_type", "mambaalign"),
                           "score": f"{model.score_description}; metrics rank by score_logit; F1-max uses an "
                                    f"oracle threshold"}
    notes = class_notes(merged)
    summary["notes"] = notes
    if has_clouds:
        summary["with_point_clouds"] = _cloud_summary(merged)
    write_text_atomic(os.path.join(args.out_dir, "summary.json"), json.dumps(summary, indent=2, allow_nan=True))
    table = format_table(summary)
    write_text_atomic(os.path.join(args.out_dir, "summary.txt"),
                      f"MambaAlign evaluation of {args.checkpoint} on {dataset} ({', '.join(objects)}), "
                      f"{summary['counts']['images']} test images, img_size {img_size}, AUPRO FPR limit "
                      f"{args.fpr_limit}{f', aux shifted {args.aux_shift} px' if args.aux_shift else ''}\n"
                      f"F1-max uses the best threshold on the test set (oracle). "
                      f"{summary['counts']['left_out_of_pixel_metrics']} anomalous image(s) without a mask in this "
                      f"modality are left out of the pixel metrics (kept in the image metrics).\n"
                      + "".join(f"{n}\n" for n in notes) + f"\n{table}\n")
    print(table)
    for obj, d in summary["decision"].items():
        if d["threshold"] is not None:
            rate = lambda r, what: f"{r:.3f} of the {what}" if r is not None and math.isfinite(r) else \
                f"none of the {what} (there are none)"
            print(f"decision at the stored threshold {d['threshold']:.4f} ({obj}): flags "
                  f"{rate(d['test_fpr'], 'good test images')} and {rate(d['test_tpr'], 'anomalous ones')}")
    for note in notes:
        print(note)
    if has_clouds:
        c = summary["with_point_clouds"]
        print(f"images + point clouds ({c['parts_with_cloud']} of {c['parts']} test parts have one): image AUROC "
              f"{c['image_auroc']:.4f}, AP {c['image_ap']:.4f} (images alone {summary['overall']['image_auroc']:.4f}, "
              f"{summary['overall']['image_ap']:.4f}; clouds alone on their parts {c['clouds_alone_auroc']:.4f})")
    if summary["counts"]["left_out_of_pixel_metrics"]:
        print(f"{summary['counts']['left_out_of_pixel_metrics']} anomalous image(s) without a mask are left out of "
              f"the pixel metrics (kept in the image metrics)")
    print(f"\nwrote {args.out_dir}/eval_results.csv, summary.txt, summary.json"
          + (f", vis/heatmaps/ and vis/overlays/ ({len(merged['path'])} images each)" if args.save_vis else "")
          + f" in {time.time() - t0:.1f} s")
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser(),
            on_interrupt=lambda args: "the evaluation writes its reports at the end, so none were written; run it "
                                      "again")
