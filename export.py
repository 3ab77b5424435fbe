"""Export a checkpoint to ONNX: the whole model, memory-bank search and score combination included.

    python export.py --checkpoint runs/demo/best_checkpoint.pth --output runs/demo/model.onnx
    python predict.py --checkpoint runs/demo/model.onnx --input parts/rgb --aux_dir parts/xyz --out_dir today

The graph takes ``rgb`` (B, 3, H, W) ImageNet-normalised (and ``aux`` (B, aux_ch, H, W) for a model with a second
modality), with a dynamic batch B and the checkpoint's training size H = W; it returns ``seg_logits`` (B, 1, H, W)
(the anomaly map is their sigmoid), ``score_logit`` (B,) and ``threshold`` (1,): the stored decision threshold
(NaN for a model without one; a part is flagged where score_logit > threshold). The file's metadata records the
input size, the aux channels and the dataset family (how predict.py reads aux files), so predict.py needs nothing
else. MambaAlign (any preset, with or without aux) and the knn baseline export; after writing, the file is run by
onnxruntime on random inputs and checked against PyTorch (``--tolerance``). The selective scan is exported through
its sequential reference (the same recurrence: no custom operator). Global alignment (--global_align shift) is not
exportable (its cross-correlation uses an FFT, which ONNX lacks): such a checkpoint is refused with that reason.
"""
from __future__ import annotations

import argparse
import io
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

from engine import (HelpFormatter, ONNX_FORMAT, OnnxModel, RunError, git_revision, load_checkpoint, load_model,
                    nonneg_float, positive_int, run_cli, write_atomic)

OPSET = 17          # GridSample (AAF's warp) needs 16; 17 is what onnxruntime 1.16+ runs everywhere


def get_args_parser():
    p = argparse.ArgumentParser("export.py", add_help=True, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a .pth from train.py (MambaAlign or knn)")
    p.add_argument("--output", required=True, help="the .onnx file to write (a new file)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--check_batch", type=positive_int, default=3,
                   help="batch size of the onnxruntime-vs-PyTorch check after export (the graph is traced at "
                        "batch 2, so another size also checks that the batch is dynamic)")
    p.add_argument("--tolerance", type=nonneg_float, default=1e-4,
                   help="largest absolute difference allowed between onnxruntime and PyTorch (maps and score_logit)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


class ExportGraph(nn.Module):
    """The model as the exported graph sees it: tensors in, (seg_logits, score_logit, threshold) out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, rgb: torch.Tensor, aux: torch.Tensor = None):
        out = self.model(rgb, aux)
        thr = getattr(self.model, "threshold", torch.tensor(float("nan"))).reshape(1).to(out["score_logit"].dtype)
        return out["seg_logits"], out["score_logit"], thr


def rebuild_for_export(ckpt: dict, source: str) -> nn.Module:
    """The checkpoint's model, in eval mode on the CPU, with the scan on its sequential reference backend."""
    kind = ckpt.get("model_type", "mambaalign") if isinstance(ckpt, dict) else None
    if kind == "knn":
        return load_model(ckpt, source=source)
    from MambaAlign import MambaAlign
    try:
        model = MambaAlign.from_loaded(ckpt, source=source, scan_backend="ref").eval()
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise RunError(f"{source} does not hold a model this version can rebuild: {exc}") from None
    if model.config.global_align != "none":
        raise RunError(f"{source} uses --global_align {model.config.global_align}: its FFT cross-correlation has no "
                       f"ONNX operator, so this model cannot be exported")
    return model


def _register_symbolics() -> None:
    """ONNX has Asinh (opset 9), but the TorchScript exporter has no rule for aten::asinh: map it."""
    torch.onnx.register_custom_op_symbolic("aten::asinh", lambda g, x: g.op("Asinh", x), 9)


def export(model: nn.Module, path: str, img_size: int, aux_ch: int, meta: dict) -> None:
    """Write ``model`` to ``path`` as ONNX (dynamic batch) with ``meta`` in the file's metadata."""
    import onnx
    _register_symbolics()
    graph = ExportGraph(model)
    rgb = torch.randn(2, 3, img_size, img_size)
    inputs, names = (rgb,), ["rgb"]
    if aux_ch:
        inputs, names = (rgb, torch.randn(2, aux_ch, img_size, img_size)), ["rgb", "aux"]
    dynamic = {n: {0: "batch"} for n in names + ["seg_logits", "score_logit"]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")           # tracer notes on Python values that are constant at a fixed size
        torch.onnx.export(graph, inputs, buffer, input_names=names,
                          output_names=["seg_logits", "score_logit", "threshold"], dynamic_axes=dynamic,
                          opset_version=OPSET, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    _name_outputs(proto, ["seg_logits", "score_logit", "threshold"])
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    write_atomic(path, lambda tmp: onnx.save(proto, tmp))


def _name_outputs(proto, names) -> None:
    """Give the graph's outputs ``names``: the TorchScript exporter cannot name an output that is a stored
    constant (the threshold buffer), so such an output is routed through an Identity node of the wanted name."""
    import onnx
    for out, name in zip(proto.graph.output, names):
        if out.name != name:
            proto.graph.node.append(onnx.helper.make_node("Identity", [out.name], [name]))
            out.name = name


@torch.no_grad()
def check_parity(model: nn.Module, path: str, img_size: int, aux_ch: int, batch: int) -> dict:
    """Largest absolute differences between onnxruntime and PyTorch on random inputs of batch ``batch``."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.randn(batch, 3, img_size, img_size, generator=g)
    aux = torch.randn(batch, aux_ch, img_size, img_size, generator=g) if aux_ch else None
    want = model(rgb, aux)
    got = OnnxModel(path)(rgb, aux)
    return {"seg_logits": float((got["seg_logits"] - want["seg_logits"]).abs().max()),
            "score_logit": float((got["score_logit"] - want["score_logit"]).abs().max())}


def main(args):
    if os.path.exists(args.output) and not args.overwrite:
        raise RunError(f"--output {args.output} exists; pass --overwrite to replace it")
    if not args.output.lower().endswith(".onnx"):
        raise RunError(f"--output {args.output}: the file name must end in .onnx")
    ckpt = load_checkpoint(args.checkpoint)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise RunError(f"{args.checkpoint} is not a checkpoint written by train.py (it must record its input size)")
    model = rebuild_for_export(ckpt, args.checkpoint)
    img_size, aux_ch = int(ckpt["args"].get("img_size") or 0), int(model.config.aux_ch)
    if not img_size:
        raise RunError(f"{args.checkpoint} does not record its input size (args.img_size)")
    meta = {"format": ONNX_FORMAT, "model_type": getattr(model, "model_type", "mambaalign"), "img_size": img_size,
            "aux_ch": aux_ch, "dataset": ckpt["args"].get("dataset") or "",
            "score_description": model.score_description, "source_checkpoint": os.path.abspath(args.checkpoint),
            "git": git_revision()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    export(model, args.output, img_size, aux_ch, meta)
    diff = check_parity(model, args.output, img_size, aux_ch, args.check_batch)
    size_mb = os.path.getsize(args.output) / 2 ** 20
    print(f"wrote {args.output} ({size_mb:.1f} MiB): {meta['model_type']}, input rgb (B, 3, {img_size}, "
          f"{img_size})" + (f" and aux (B, {aux_ch}, {img_size}, {img_size})" if aux_ch else "")
          + f", outputs seg_logits, score_logit, threshold (= {float(model.threshold):.4f})")
    print(f"onnxruntime vs PyTorch on a random batch of {args.check_batch}: largest difference "
          f"{diff['seg_logits']:.2e} "
          f"on seg_logits, {diff['score_logit']:.2e} on score_logit (tolerance {args.tolerance:g})")
    if not (np.isfinite(list(diff.values())).all() and max(diff.values()) <= args.tolerance):
        os.remove(args.output)
        raise RunError(f"the exported graph does not agree with PyTorch within {args.tolerance:g} ({diff}); "
                       f"{args.output} removed")
    return diff


if __name__ == "__main__":
    run_cli(main, get_args_parser())
