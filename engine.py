"""Inference and run plumbing shared by train.py and eval.py.

This file is not in DESIGN.md's layout. It exists because both scripts need the same inference loop (train.py
for model selection on the validation split, eval.py on the test split), and the design forbids a module
importing a script; keeping one copy here guarantees validation and test numbers are computed the same way.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.synthesis import misalign

__all__ = ["resolve_device", "autocast_context", "run_inference", "git_revision", "dist_info", "load_model",
           "save_atomic", "MODEL_TYPES"]

# The model families a checkpoint can hold; its "model_type" entry names one (absent: a MambaAlign checkpoint
# or a raw MambaAlign state dict).
MODEL_TYPES = ("mambaalign", "knn")


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a reader never sees a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_model(ckpt, config=None, source: str = "checkpoint"):
    """Rebuild the model a loaded checkpoint holds: a MambaAlign (training checkpoint, or a raw state dict with
    ``config``) or a fitted knn baseline (``model_type: "knn"``). Returns it in eval mode."""
    kind = ckpt.get("model_type", "mambaalign") if isinstance(ckpt, dict) else "mambaalign"
    if kind not in MODEL_TYPES:
        raise ValueError(f"{source}: unknown model_type {kind!r}; this version reads {MODEL_TYPES}")
    if kind == "knn":
        from knn import PatchKNN
        return PatchKNN.from_loaded(ckpt, source=source).eval()
    from MambaAlign import MambaAlign
    return MambaAlign.from_loaded(ckpt, config=config, source=source).eval()


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def autocast_context(device: torch.device, enabled: bool):
    """One autocast context for the whole repo: bf16 where the device supports it, else fp16 (CUDA only)."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def git_revision() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown (not a git checkout)"
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def dist_info():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a single process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


@torch.no_grad()
def run_inference(model, loader: DataLoader, device: torch.device, amp: bool = False, aux_shift: float = 0.0,
                  progress: bool = True, desc: str = "inference", keep_inputs: bool = False) -> Dict[str, object]:
    """Run `model` over `loader` in eval mode. Returns numpy arrays: score, score_logit (N,), label (N,),
    maps (N, H, W) = anomaly_map, masks (N, H, W) bool; lists path, defect, object; and with ``keep_inputs``
    the rgb / aux tensors (for visualisation). ``aux_shift`` shifts aux right by that many pixels."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    out: Dict[str, List] = {k: [] for k in ("score", "score_logit", "label", "maps", "masks", "path", "defect",
                                            "object", "rgb", "aux")}
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            rgb = batch["rgb"].to(device, non_blocking=True)
            aux = batch.get("aux")
            if aux is not None:
                if aux_shift:
                    aux = torch.stack([misalign(a, None, 0.0, shift=(aux_shift, 0.0)) for a in aux])
                aux = aux.to(device, non_blocking=True)
            with autocast_context(device, amp):
                pred = model(rgb, aux)
            out["score"].append(pred["score"].float().cpu().numpy())
            out["score_logit"].append(pred["score_logit"].float().cpu().numpy())
            out["maps"].append(pred["anomaly_map"][:, 0].float().cpu().numpy())
            out["masks"].append(batch["mask"][:, 0].numpy() > 0.5)
            out["label"].append(np.asarray(batch["label"]))
            for k in ("path", "defect", "object"):
                out[k].extend(list(batch[k]))
            if keep_inputs:
                out["rgb"].append(batch["rgb"])
                if batch.get("aux") is not None:
                    out["aux"].append(batch["aux"])
    finally:
        model.train(was_training)
    res: Dict[str, object] = {k: np.concatenate(out[k]) for k in ("score", "score_logit", "label", "maps", "masks")}
    res.update({k: out[k] for k in ("path", "defect", "object")})
    if keep_inputs:
        res["rgb"] = torch.cat(out["rgb"]) if out["rgb"] else None
        res["aux"] = torch.cat(out["aux"]) if out["aux"] else None
    return res
