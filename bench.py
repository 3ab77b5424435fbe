"""Speed and memory benchmarks. Every ratio is measured in the same run; nothing here is a test.

    python bench.py scan       selective scan: fast `torch` backend vs the sequential `ref`
    python bench.py block      one QSVSS block: forward / forward+backward time, peak memory, scan share
    python bench.py model      whole model vs the bare two-branch backbone, tiny and base presets
    python bench.py metrics    AUPRO on 200 maps of 256x256
    python bench.py ablation   train + evaluate the ablation variants with one budget, one table
    python bench.py compare    MambaAlign beside the baselines (border-median floor, knn RGB / aux / fused) on the
                               synthetic objects and the real classes, one table from one run
    python bench.py fit        one class: knn fit and eval, MambaAlign bank fit, epochs and eval, each beside the
                               bare backbone pass over the same images
    python bench.py decision   MulSen-AD classes: the stored threshold's share of good / anomalous test parts
                               flagged, before and after the calibration change, and after --calibrate_on
    python bench.py pointcloud load time per raw / prepared MVTec 3D-AD sample, FPFH time per cloud
    python bench.py coreset    the exact greedy coreset beside the former algorithm, up to 230k rows x 1000 dims
    python bench.py all        scan, block, model, metrics

``--device cuda`` runs scan, block and model on a GPU (times between device synchronisations, memory as the
caching allocator's peak); the scan table then adds mamba-ssm's fused kernel where it imports, and
``--scan_backend`` picks the backend of block and model.

Peak memory is the process's resident-set high-water mark (Linux VmHWM, reset before each measurement)
minus the resident size just before it: what the measured call added on top of its inputs. bench.py re-runs
itself with glibc's mmap threshold fixed at 64 KiB and trims the heap before each measurement, so memory an
earlier measurement freed is not resident any more: otherwise it is silently reused and the mark misses it.
``ablation`` and ``compare`` measure no memory and run with the allocator's defaults: the fixed threshold maps and
unmaps
every large tensor, which doubled training time (a third of it in the kernel).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from typing import Callable, List, Optional

import numpy as np
import torch

from selective_scan import BACKENDS


# ----------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _trim_heap() -> None:
    """Give free heap pages back to the system (glibc malloc_trim), so memory an earlier measurement freed but
    glibc kept resident is not silently reused: reused pages fault back in and count."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_mib(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Run fn once and return the peak memory it added, in MiB: on CPU the resident set (Linux only; NaN
    elsewhere), on CUDA the caching allocator's peak of allocated bytes."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")                       # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
    except OSError:
        return float("nan")
    fn()
    return (_status_kib("VmHWM") - before) / 1024.0


def time_it(fn: Callable[[], object], repeats: int, warmup: int = 1,
            device: torch.device = torch.device("cpu")) -> float:
    """Median wall time of fn over `repeats` runs, after `warmup` runs (which also trigger compilation); on
    CUDA the device is synchronised before the clock starts and before it stops."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(title: str, header: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def _pin_threads(n: int) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _scan_backend(args) -> str:
    """The backend the block and model benchmarks actually run (what `auto` resolves to on the device)."""
    from selective_scan import resolve_backend
    return resolve_backend(args.scan_backend, args.device)


def _where(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------------
# scan
# ----------------------------------------------------------------------------------------------------

def _scan_inputs(batch, dim, L, dstate, groups, seed=0):
    from selective_scan import dt_bias_init
    g = torch.Generator().manual_seed(seed)
    delta_bias = dt_bias_init(dim, generator=g)
    return dict(
        u=torch.randn(batch, dim, L, generator=g),
        delta=0.1 * torch.randn(batch, dim, L, generator=g),
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, groups, dstate, L, generator=g),
        C=torch.randn(batch, groups, dstate, L, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, L, generator=g),
        delta_bias=delta_bias,
    )


def bench_scan(args) -> None:
    """torch vs ref; on CUDA also our Triton kernels (backend "triton") and mamba-ssm's fused kernel (backend
    "cuda") where they import."""
    import selective_scan
    from selective_scan import selective_scan_fn
    dev = args.device
    shapes = [(2, 384, 4096, 16, 4), (2, 192, 1024, 16, 4)]
    backends = ["torch", "ref"]  # torch first: its memory is measured on a heap the ref has not used
    with_cuda = dev.type == "cuda" and selective_scan.cuda_backend_available()
    with_triton = dev.type == "cuda" and selective_scan._triton_module().available(dev)
    if with_cuda:
        backends.append("cuda")
    elif dev.type == "cuda":
        print(f"mamba-ssm is not importable ({selective_scan._cuda_import_error!r}): no 'cuda' backend column")
    if with_triton:
        backends.append("triton")
    rows = []
    for shape in shapes:
        inputs = {k: v.to(dev) for k, v in _scan_inputs(*shape).items()}
        res = {}
        for backend in backends:
            leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}

            def fwd():
                with torch.no_grad():
                    return selective_scan_fn(**leaves, delta_softplus=True, backend=backend)

            def fwd_bwd():
                for v in leaves.values():
                    v.grad = None
                selective_scan_fn(**leaves, delta_softplus=True, backend=backend).sum().backward()

            t_f = time_it(fwd, args.repeats, device=dev)
            t_fb = time_it(fwd_bwd, args.repeats, device=dev)
            mem = peak_extra_mib(fwd_bwd, dev)
            res[backend] = (t_f, t_fb, mem)
        (rf, rfb, rm), (tf, tfb, tm) = res["ref"], res["torch"]
        row = [str(shape), f"{rf * 1e3:.0f}", f"{tf * 1e3:.0f}", f"{rf / tf:.1f}x",
               f"{rfb * 1e3:.0f}", f"{tfb * 1e3:.0f}", f"{rfb / tfb:.1f}x", f"{rm:.0f}", f"{tm:.0f}"]
        if with_cuda:
            cf, cfb, cm = res["cuda"]
            row += [f"{cf * 1e3:.1f}", f"{cfb * 1e3:.1f}", f"{tf / cf:.1f}x", f"{tfb / cfb:.1f}x", f"{cm:.0f}"]
        if with_triton:
            xf, xfb, xm = res["triton"]
            row += [f"{xf * 1e3:.1f}", f"{xfb * 1e3:.1f}", f"{tfb / xfb:.1f}x", f"{xm:.0f}"]
            if with_cuda:
                row += [f"{xf / res['cuda'][0]:.2f}x", f"{xfb / res['cuda'][1]:.2f}x"]
        rows.append(row)
    header = ["shape", "fwd ref ms", "fwd torch ms", "fwd speed-up", "fwd+bwd ref ms", "fwd+bwd torch ms",
              "fwd+bwd speed-up", "peak ref MiB", "peak torch MiB"]
    if with_cuda:
        header += ["fwd cuda ms", "fwd+bwd cuda ms", "fwd torch/cuda", "fwd+bwd torch/cuda", "peak cuda MiB"]
    if with_triton:
        header += ["fwd triton ms", "fwd+bwd triton ms", "fwd+bwd torch/triton", "peak triton MiB"]
        if with_cuda:
            header += ["fwd triton/cuda", "fwd+bwd triton/cuda"]
    print_table(f"selective scan on {_where(dev)}, median of {args.repeats}; shape = (batch, dim, L, dstate, "
                f"groups)", header, rows)


# ----------------------------------------------------------------------------------------------------
# block
# ----------------------------------------------------------------------------------------------------

def bench_block(args) -> None:
    import pmm_qsvss
    from pmm_qsvss import QSVSSBlock
    dev = args.device
    rows = []
    for (b, c, h, w) in [(8, 128, 32, 32), (2, 256, 64, 64)]:
        torch.manual_seed(0)
        blk = QSVSSBlock(c, d_state=16, scan_backend=args.scan_backend).to(dev)
        x = torch.randn(b, c, h, w, device=dev, requires_grad=True)
        captured = {}
        original = pmm_qsvss.selective_scan_fn

        def capture(*a, **kw):
            captured.setdefault("args", (a, kw))
            return original(*a, **kw)

        pmm_qsvss.selective_scan_fn = capture
        try:
            blk(x)
        finally:
            pmm_qsvss.selective_scan_fn = original
        s_args, s_kw = captured["args"]
        s_leaves = [t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
                    for t in s_args]
        s_kw = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) else v) for k, v in s_kw.items()}

        def fwd():
            with torch.no_grad():
                blk(x)

        def fwd_bwd():
            blk.zero_grad(set_to_none=True)
            blk(x).sum().backward()

        def scan_fwd_bwd():
            original(*s_leaves, **s_kw).sum().backward()

        t_f = time_it(fwd, args.repeats, device=dev)
        t_fb = time_it(fwd_bwd, args.repeats, device=dev)
        t_scan = time_it(scan_fwd_bwd, args.repeats, device=dev)
        mem = peak_extra_mib(fwd_bwd, dev)
        rows.append([str((b, c, h, w)), f"{t_f * 1e3:.0f}", f"{t_fb * 1e3:.0f}", f"{mem:.0f}",
                     f"{100 * t_scan / t_fb:.0f}%"])
    print_table(f"QSVSS block on {_where(dev)}, scan backend {_scan_backend(args)}, d_state 16, ssm_ratio 2, "
                f"median of {args.repeats}",
                ["input (B, C, H, W)", "fwd ms", "fwd+bwd ms", "peak fwd+bwd MiB", "scan share of fwd+bwd"],
                rows)


# ----------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------

def bench_model(args) -> None:
    from MambaAlign import PRESETS, MambaAlign, MambaAlignConfig
    from rgbx_backbone import RGBXBackbone
    rows = []
    size = args.size
    dev = args.device
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown or not presets:
        raise SystemExit(f"--presets {args.presets!r}: choose among {', '.join(sorted(PRESETS))}")
    for preset in presets:
        cfg = MambaAlignConfig.preset(preset, aux_ch=3)
        model = MambaAlign(cfg, scan_backend=args.scan_backend).eval()
        if model.bank is not None:   # a full-size bank (coreset_size rows per modality) of random features
            dim = model.bank.bank_rgb.shape[1]
            n = -(-cfg.bank_size // 1024)
            model.bank.build({m: torch.randn(n, dim, 32, 32) for m in model.modalities}, torch.arange(n))
        model = model.to(dev)
        backbone = RGBXBackbone(cfg.backbone, 3, stages=(2, 3, 4, 5)).eval().to(dev)
        rgb, aux = torch.randn(1, 3, size, size, device=dev), torch.randn(1, 3, size, size, device=dev)

        def run_model():
            with torch.no_grad():
                model(rgb, aux)

        def run_backbone():
            with torch.no_grad():
                backbone(rgb, aux)

        t_m = time_it(run_model, args.repeats, warmup=2, device=dev)
        t_b = time_it(run_backbone, args.repeats, warmup=2, device=dev)
        mem = peak_extra_mib(run_model, dev)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        bparams = sum(p.numel() for p in backbone.parameters()) / 1e6
        ort = _onnx_latency(model, size, args) if preset == "tiny" and dev.type == "cpu" else None
        rows.append([preset, cfg.backbone, f"{params:.1f}", f"{bparams:.1f}", f"{t_m * 1e3:.0f}", f"{t_b * 1e3:.0f}",
                     f"{t_m / t_b:.2f}x", f"{mem:.0f}", f"{ort * 1e3:.0f}" if ort else "-",
                     f"{ort / t_m:.2f}x" if ort else "-"])
    print_table(f"inference per image on {_where(args.device)}, scan backend {_scan_backend(args)}, "
                f"RGB + normals at {size}x{size}, "
                f"batch 1, median of {args.repeats}; onnxruntime (CPU, {torch.get_num_threads()} threads) on the "
                f"graph export.py writes",
                ["preset", "backbone", "params M", "backbone params M", "model ms", "bare backbone ms",
                 "model / backbone", "peak MiB", "onnxruntime ms", "onnxruntime / PyTorch"], rows)
    print("(the base preset's PMM scans 1024-step sequences, which the exported graph unrolls step by step: "
          "bench.py exports the tiny preset only)")


def _onnx_latency(model, size: int, args) -> float:
    """Seconds per image of the model exported to ONNX (export.py's graph, the sequential scan) under
    onnxruntime on the CPU, with as many threads as PyTorch uses."""
    import tempfile
    import onnxruntime as ort
    import export as export_script
    from MambaAlign import MambaAlign
    ref = MambaAlign(model.config, scan_backend="ref").eval()
    ref.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        export_script.export(ref, path, size, model.config.aux_ch, {"format": "bench"})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {"rgb": torch.randn(1, 3, size, size).numpy(), "aux": torch.randn(1, model.config.aux_ch, size,
                                                                            size).numpy()}
    return time_it(lambda: sess.run(None, feeds), args.repeats, warmup=2)


# ----------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------

def bench_metrics(args) -> None:
    import numpy as np
    import metrics
    rng = np.random.default_rng(0)
    n, size = 200, 256
    maps = rng.random((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n // 2):  # half the images carry one or two defect regions
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 40, 2)
            h, w = rng.integers(5, 40, 2)
            masks[i, y:y + h, x:x + w] = True
    maps[masks] += 0.3
    rows = []
    for name, fn in (("aupro (fpr_limit 0.3)", lambda: metrics.aupro(maps, masks, 0.3)),
                     ("pixel_auroc", lambda: metrics.pixel_auroc(maps, masks)),
                     ("compute_metrics (all 7)", lambda: metrics.compute_metrics(
                         maps.reshape(n, -1).max(1), masks.reshape(n, -1).any(1), maps, masks))):
        t = time_it(fn, args.repeats, warmup=0)
        rows.append([name, f"{t:.2f}"])
    print_table(f"metrics on {n} maps of {size}x{size} ({n * size * size / 1e6:.1f} M pixels), median of "
                f"{args.repeats}", ["function", "seconds"], rows)


# ----------------------------------------------------------------------------------------------------
# ablation
# ----------------------------------------------------------------------------------------------------

def _summary_decision(summary) -> dict:
    """The share of good / anomalous test parts flagged at the stored threshold, from eval.py's summary (NaN
    where the checkpoint has no threshold)."""
    decision = next(iter(summary["decision"].values()))
    nan = lambda v: float("nan") if v is None else v
    return {"good_flagged": nan(decision["test_fpr"]), "anomalous_flagged": nan(decision["test_tpr"])}


def _flagged_cell(m) -> str:
    """'good / anomalous' flagged shares of a result dict, '-' for a method without a threshold."""
    good, bad = m["good_flagged"], m["anomalous_flagged"]
    return "-" if math.isnan(good) and math.isnan(bad) else f"{good:.2f} / {bad:.2f}"


ABLATIONS = {"full": [], "RGB-only": ["--aux_ch", "0"], "no bank": ["--no_bank"], "PMM on": ["--pmm", "on"],
             "no PMM": ["--pmm", "off"],
             "no CMI": ["--no_cmi"], "no AAF": ["--no_aaf"], "global align": ["--global_align", "shift"],
             "head score": ["--image_score", "head"], "pool 0": ["--synth_pool", "0"], "pool 2": ["--synth_pool", "2"],
             "pool 8": ["--synth_pool", "8"]}
ABLATION_KEYS = ("image_auroc", "aupro", "aupro_0.05", "aupro_0.01")


def _train(argv: List[str]):
    """train.py's main on ``argv`` plus ``--overwrite``: every benchmark trains into folders of its own
    ``--out_dir``, so running a benchmark again replaces its earlier runs there."""
    import train as train_script
    return train_script.main(train_script.get_args_parser().parse_args(list(argv) + ["--overwrite"]))


def bench_ablation(args) -> None:
    """Train and evaluate every variant with the same budget and seeds; one table of mean ± std over seeds."""
    import json
    import statistics as st
    import eval as eval_script
    # Everything not listed here is train.py's default, as in `make demo`.
    common = ["--dataset", args.dataset, "--object", args.object, "--img_size", str(args.img_size),
              "--epochs", str(args.epochs), "--data_seed", str(args.data_seed), "--quiet"]
    if args.data_root:
        common += ["--data_root", args.data_root]
    variants = args.variants.split(",") if args.variants else list(ABLATIONS)
    unknown = [v for v in variants if v not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(ABLATIONS)}")
    aux = ["--aux_ch", str(args.aux_ch)] if args.aux_ch is not None else []
    results, rows = {}, []
    for name in variants:
        extra = list(ABLATIONS[name]) if name == "RGB-only" else aux + list(ABLATIONS[name])
        runs, t0 = [], time.time()
        for seed in range(args.seed, args.seed + args.seeds):
            out = os.path.join(args.out_dir, f"{name.replace(' ', '_').lower()}_seed{seed}")
            _train(common + extra + ["--seed", str(seed), "--out_dir", out])
            summary = eval_script.main(eval_script.get_args_parser().parse_args(
                ["--checkpoint", os.path.join(out, "best_checkpoint.pth"), "--out_dir", os.path.join(out, "eval"),
                 "--quiet"]))
            before = _rates_at(os.path.join(out, "eval"),
                               _heldout_only_threshold(os.path.join(out, "best_checkpoint.pth")))
            runs.append(dict({k: summary["overall"][k] for k in ABLATION_KEYS}, **_summary_decision(summary),
                             good_flagged_heldout=before[0], anomalous_flagged_heldout=before[1]))
        results[name] = {"runs": runs, "min_per_run": (time.time() - t0) / 60 / len(runs)}
        with open(os.path.join(args.out_dir, "ablation.json"), "w") as fh:
            json.dump(results, fh, indent=1)

    def cell(runs, k):
        vals = [r[k] for r in runs]
        return f"{st.mean(vals):.3f}" + (f" ± {st.stdev(vals):.3f}" if len(vals) > 1 else "")

    for name, r in results.items():
        mean = lambda k: st.mean(run[k] for run in r["runs"])
        flagged = {k: mean(k) for k in ("good_flagged", "anomalous_flagged")}
        heldout = {k: mean(k + "_heldout") for k in ("good_flagged", "anomalous_flagged")}
        rows.append([name, " ".join(ABLATIONS[name]) or "(defaults)"] + [cell(r["runs"], k) for k in ABLATION_KEYS]
                    + [_flagged_cell(flagged), _flagged_cell(heldout), f"{r['min_per_run']:.1f}"])
    split = f", data seed {args.data_seed}" if args.dataset == "synthetic" else ""
    print_table(f"ablation on {args.dataset}/{args.object}{split} at {args.img_size}px, {args.epochs} epochs, seeds "
                f"{args.seed}..{args.seed + args.seeds - 1}, mean ± std (test split, via eval.py); flagged: share "
                f"of good / anomalous test parts above the stored threshold (held-out + bank leave-one-out normals) "
                f"and above the threshold of the held-out normals alone, mean over seeds",
                ["variant", "train.py flags", "image AUROC", "AUPRO 0.3", "AUPRO 0.05", "AUPRO 0.01",
                 "flagged (stored)", "flagged (held-out only)", "min / run"],
                rows)


# ----------------------------------------------------------------------------------------------------
# compare: the method beside the baselines a reviewer asks for, in one run
# ----------------------------------------------------------------------------------------------------

COMPARE_KEYS = ("image_auroc", "pixel_auroc", "aupro", "aupro_0.05")
DECISION_KEYS = ("good_flagged", "anomalous_flagged")          # at the stored threshold (NaN: no threshold)


def floor_map(rgb01: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """The training-free floor: each pixel's colour distance to the median colour of the image border, blurred.
    It marks the whole object and knows nothing of defects. rgb01: (B, 3, H, W) in [0, 1] -> (B, 1, H, W)."""
    from knn import gaussian_blur
    border = torch.cat([rgb01[..., 0, :], rgb01[..., -1, :], rgb01[..., :, 0], rgb01[..., :, -1]], dim=-1)
    med = border.median(dim=-1).values[..., None, None]                      # (B, 3, 1, 1)
    return gaussian_blur((rgb01 - med).norm(dim=1, keepdim=True), sigma)


def _metrics_of(scores, labels, maps, masks, decisions=None):
    """COMPARE_KEYS of one method's test scores, and the share of good / anomalous parts its stored threshold
    flags (``decisions``, 0/1 per image; NaN for a method without a threshold)."""
    import warnings
    import metrics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = metrics.compute_metrics(scores, labels, maps, masks)
    out = {k: m[k] for k in COMPARE_KEYS}
    for key, label in (("good_flagged", 0), ("anomalous_flagged", 1)):
        pick = labels == label
        out[key] = float(decisions[pick].mean()) if decisions is not None and pick.any() else float("nan")
    return out


def _test_loader(dataset, root, obj, img_size, aux_ch, seed=0):
    from torch.utils.data import DataLoader
    from datasets import build_dataset
    kw = {"seed": seed} if dataset == "synthetic" else {}
    return DataLoader(build_dataset(dataset, root, obj, "test", img_size, aux_ch, **kw), batch_size=8)


def _score_test_split(dataset, root, obj, img_size, aux_ch, scorer):
    """Run ``scorer(batch) -> {method: (map (B, 1, H, W), image score (B,), decision (B,) or None)}`` over a
    test split; metrics per method."""
    import numpy as np
    cat = np.concatenate
    res = {}
    for b in _test_loader(dataset, root, obj, img_size, aux_ch):
        for name, (maps, scores, decisions) in scorer(b).items():
            r = res.setdefault(name, {"s": [], "m": [], "y": [], "g": [], "d": []})
            r["s"].append(scores.numpy())
            r["m"].append(maps[:, 0].numpy())
            r["y"].append(np.asarray(b["label"]))
            r["g"].append(b["mask"][:, 0].numpy() > 0.5)
            if decisions is not None:
                r["d"].append(decisions.float().numpy())
    return {name: _metrics_of(cat(r["s"]), cat(r["y"]), cat(r["m"]), cat(r["g"]), cat(r["d"]) if r["d"] else None)
            for name, r in res.items()}


def _compare_floor(dataset, root, obj, img_size):
    from datasets.transforms import denormalize_rgb

    def scorer(b):
        m = floor_map(torch.stack([denormalize_rgb(x) for x in b["rgb"]]))
        return {"floor (border-median colour distance)": (m, m.flatten(1).amax(1), None)}
    return _score_test_split(dataset, root, obj, img_size, 0, scorer)


def _compare_knn(args, dataset, root, obj, aux_ch, out):
    """Fit one knn checkpoint through train.py, then score the test split with each modality and fused."""
    from engine import load_checkpoint, load_model
    argv = ["--model", "knn", "--dataset", dataset, "--object", obj, "--img_size", str(args.img_size),
            "--aux_ch", str(aux_ch), "--out_dir", out, "--quiet"] + (["--data_root", root] if root else [])
    _train(argv)
    model = load_model(load_checkpoint(os.path.join(out, "best_checkpoint.pth")))

    def scorer(b):
        o = model(b["rgb"], b.get("aux"))
        decision = o["score_logit"] > model.threshold                     # the stored threshold, fused score
        parts = {f"knn {m}": (v["map"], v["score"], None) for m, v in o["per_modality"].items()}
        parts[f"knn {'fused' if aux_ch else 'rgb'}"] = (o["seg_logits"], o["score_logit"], decision)
        return parts
    return _score_test_split(dataset, root, obj, args.img_size, aux_ch, scorer)


def _mvtec3d_tree(args, obj, out) -> str:
    """A synthetic object (dataset seed --data_seed) written as an MVTec 3D-AD tree and prepared (normals and FPFH
    cached); returns the prepared root."""
    import prepare_data
    from datasets.synthetic import write_mvtec3d_tree
    raw = os.path.join(out, f"mvtec3d_raw_seed{args.data_seed}")
    prep = os.path.join(out, f"mvtec3d_prep_seed{args.data_seed}")
    if not os.path.isdir(os.path.join(prep, obj)):
        write_mvtec3d_tree(raw, obj, args.img_size, seed=args.data_seed)
        prepare_data.prepare_mvtec3d(raw, prep, progress=False, fpfh=True, dist=1.0)
    return prep


def _compare_knn_fpfh(args, obj, out, prep):
    """BTF's rows on the prepared MVTec 3D-AD tree ``prep`` of a synthetic object: knn on FPFH alone and
    RGB + FPFH fused (train.py --model knn --aux_feature fpfh)."""
    from engine import load_checkpoint, load_model
    argv = ["--model", "knn", "--dataset", "mvtec3d", "--data_root", prep, "--object", obj, "--img_size",
            str(args.img_size), "--aux_feature", "fpfh", "--out_dir", os.path.join(out, "knn_fpfh"), "--quiet"]
    _train(argv)
    model = load_model(load_checkpoint(os.path.join(out, "knn_fpfh", "best_checkpoint.pth")))

    def scorer(b):
        o = model(b["rgb"], b["aux"])
        return {"knn fpfh": (o["per_modality"]["aux"]["map"], o["per_modality"]["aux"]["score"], None),
                "knn rgb+fpfh": (o["seg_logits"], o["score_logit"], o["score_logit"] > model.threshold)}
    return _score_test_split("mvtec3d", prep, obj, args.img_size, 33, scorer)


def _compare_model(args, dataset, root, obj, model_args, seed, out):
    """Train MambaAlign (train.py with ``model_args``, e.g. ["--aux_ch", "3"]) and evaluate it on the test split."""
    import eval as eval_script
    argv = ["--dataset", dataset, "--object", obj, "--img_size", str(args.img_size), *model_args,
            "--epochs", str(args.epochs), "--seed", str(seed), "--out_dir", out, "--quiet"] + \
        (["--data_root", root] if root else [])
    _train(argv)
    summary = eval_script.main(eval_script.get_args_parser().parse_args(
        ["--checkpoint", os.path.join(out, "best_checkpoint.pth"), "--out_dir", os.path.join(out, "eval"),
         "--quiet"]))
    return dict({k: summary["overall"][k] for k in COMPARE_KEYS}, **_summary_decision(summary))


def _compare_sets(args):
    """(dataset family, root, object, aux_ch of the data, seeds for trained models) of every compared class."""
    from datasets import default_aux_ch, list_objects
    from datasets.synthetic import OBJECT_TYPES
    objects = OBJECT_TYPES if not args.objects else [o.strip() for o in args.objects.split(",") if o.strip()]
    unknown = sorted(set(objects) - set(OBJECT_TYPES))
    if unknown:
        raise SystemExit(f"--objects: unknown synthetic object(s) {unknown}; choose from {list(OBJECT_TYPES)}")
    sets = [("synthetic", None, o, 3, args.seeds if i == 0 or args.rows == "geometry" else 1)
            for i, o in enumerate(objects)]
    for family, root in (("mulsenad", args.mulsen_root), ("mvtec", args.mvtec_root)):
        if not root or args.rows == "geometry":
            continue
        if not os.path.isdir(root):
            raise SystemExit(f"--{family.replace('mulsenad', 'mulsen')}_root {root}: folder not found")
        sets += [(family, root, o, default_aux_ch(family), args.seeds) for o in list_objects(family, root)]
    return sets


def bench_compare(args) -> None:
    """One table, one run: floor, knn (RGB, aux, fused), MambaAlign RGB-only and RGB + aux, per class."""
    import json
    import statistics as st
    results, rows = {}, []
    t_all = time.time()
    geometry_only = args.rows == "geometry"
    for dataset, root, obj, aux_ch, n_seeds in _compare_sets(args):
        name = f"{dataset}/{obj}"
        out = os.path.join(args.out_dir, dataset, obj)
        per = {}

        def trained(label, family, data_root, model_args, tag):
            runs, t0 = [], time.time()
            for seed in range(n_seeds):
                runs.append(_compare_model(args, family, data_root, obj, model_args, seed,
                                           os.path.join(out, f"mambaalign_{tag}_seed{seed}")))
            mean = {k: st.mean(r[k] for r in runs) for k in COMPARE_KEYS + DECISION_KEYS}
            std = {k: st.stdev([r[k] for r in runs]) for k in COMPARE_KEYS} if len(runs) > 1 else None
            per[label] = {"mean": mean, "std": std, "seeds": len(runs), "time_s": (time.time() - t0) / len(runs)}

        if not geometry_only:
            t0 = time.time()
            for method, m in _compare_floor(dataset, root, obj, args.img_size).items():
                per[method] = {"mean": m, "std": None, "seeds": 1, "time_s": time.time() - t0}
            t0 = time.time()
            knn = _compare_knn(args, dataset, root, obj, aux_ch, os.path.join(out, "knn"))
            for method, m in knn.items():
                per[method] = {"mean": m, "std": None, "seeds": 1, "time_s": time.time() - t0}
        if dataset == "synthetic" and args.fpfh:
            t0 = time.time()
            prep = _mvtec3d_tree(args, obj, out)
            for method, m in _compare_knn_fpfh(args, obj, out, prep).items():
                per[method] = {"mean": m, "std": None, "seeds": 1, "time_s": time.time() - t0}
            # The same tree for both: MambaAlign with its CNN bank of the normals image, and with the FPFH bank.
            trained("MambaAlign normals (3D-AD tree)", "mvtec3d", prep, ["--aux_ch", "3"],
                    f"tree{args.data_seed}_normals")
            trained("MambaAlign normals + FPFH bank", "mvtec3d", prep, ["--aux_feature", "fpfh"],
                    f"tree{args.data_seed}_fpfh")
        if not geometry_only:
            trained("MambaAlign RGB-only", dataset, root, ["--aux_ch", "0"], "aux0")
            if aux_ch:
                trained("MambaAlign RGB + aux", dataset, root, ["--aux_ch", str(aux_ch)], f"aux{aux_ch}")
        if per:
            results[name] = per
        with open(os.path.join(args.out_dir, "compare.json"), "w") as fh:
            json.dump(results, fh, indent=1)

    def cell(v, k):
        m = v["mean"][k]
        return f"{m:.3f}" + (f" ± {v['std'][k]:.3f}" if v["std"] else "")

    for name, per in results.items():
        for method, v in per.items():
            rows.append([name, method, str(v["seeds"])] + [cell(v, k) for k in COMPARE_KEYS]
                        + [_flagged_cell(v["mean"]), f"{v['time_s']:.0f}"])
    methods = list(dict.fromkeys(m for per in results.values() for m in per))
    for method in methods:
        have = [per[method]["mean"] for per in results.values() if method in per]
        pooled = {k: st.mean(h[k] for h in have) for k in COMPARE_KEYS + DECISION_KEYS}
        rows.append(["mean", method, f"{len(have)} classes"]
                    + [f"{pooled[k]:.3f}" for k in COMPARE_KEYS] + [_flagged_cell(pooled), ""])
    where = ("on every object" if args.rows == "geometry" else
             f"on the real classes and synthetic/{_compare_sets(args)[0][2]} (one seed elsewhere)")
    trees = f"3D-AD trees of dataset seed {args.data_seed}; " if args.fpfh else ""
    print_table(f"compare at {args.img_size}px; trained models: {args.epochs} epochs, seeds 0..{args.seeds - 1} "
                f"{where}, mean ± std over seeds; {trees}"
                f"test splits via eval.py; flagged: share of good / anomalous test parts above the stored "
                f"threshold (mean over seeds; - where a method has none); whole table "
                f"{(time.time() - t_all) / 60:.1f} min",
                ["class", "method", "seeds", "image AUROC", "pixel AUROC", "AUPRO 0.3", "AUPRO 0.05",
                 "good / anomalous flagged", "s / run"],
                rows)


# ----------------------------------------------------------------------------------------------------
# fit: what a class costs, beside the bare backbone pass over the same images
# ----------------------------------------------------------------------------------------------------

def _backbone_floor(args, datasets, device, fold: bool = True) -> float:
    """Seconds of the bare two-branch backbone (stages 2-5, frozen, eval) over every image of ``datasets``, the
    images already in memory: the floor no method on these features can beat. The median of 3 passes after a
    warm-up: one pass moved by up to 2x between runs on a shared machine, and every ratio with it.
    ``fold=False``: the stacked network with its norms as they are (what every pass ran before the folded
    copies), for the before/after in one run."""
    from torch.utils.data import DataLoader
    from rgbx_backbone import RGBXBackbone
    aux_ch = datasets[0].aux_ch
    backbone = RGBXBackbone("efficientnet_lite0", aux_ch, pretrained=True, freeze=True,
                            stages=(2, 3, 4, 5)).eval().to(device)
    backbone.fold_norms = fold
    batches = [b for ds in datasets for b in DataLoader(ds, batch_size=8)]
    run = lambda: [backbone(b["rgb"].to(device), b["aux"].to(device) if aux_ch else None) for b in batches]
    with torch.no_grad():
        return time_it(run, repeats=3, warmup=1, device=device)


def _fit_once(args, train_ds, test_ds, common: List[str], out: str) -> dict:
    """One interleaved run of every phase bench_fit reports: the bare backbone floor over the train and the test
    images, the knn's fit and eval, MambaAlign's train.py and eval.py. -> seconds per phase and the eval summary."""
    import json
    import eval as eval_script
    import train  # noqa: F401  (imported before anything is timed: _train imports it again for free)
    dev = args.device
    timed = {"floor train": _backbone_floor(args, [train_ds], dev), "floor test": _backbone_floor(args, [test_ds], dev),
             "stacked": _backbone_floor(args, [train_ds, test_ds], dev, fold=False)}

    def run(name, fn):
        t0 = time.perf_counter()
        res = fn()
        timed[name] = time.perf_counter() - t0
        return res

    knn_dir, ma_dir = os.path.join(out, "knn"), os.path.join(out, "mambaalign")
    run("knn fit", lambda: _train(common + ["--model", "knn", "--out_dir", knn_dir]))
    run("knn eval", lambda: eval_script.main(eval_script.get_args_parser().parse_args(
        ["--checkpoint", os.path.join(knn_dir, "best_checkpoint.pth"), "--out_dir", os.path.join(knn_dir, "eval"),
         "--quiet", "--device", str(dev)])))
    run("MambaAlign train", lambda: _train(common + ["--epochs", str(args.epochs), "--out_dir", ma_dir]))
    summary = run("MambaAlign eval", lambda: eval_script.main(eval_script.get_args_parser().parse_args(
        ["--checkpoint", os.path.join(ma_dir, "best_checkpoint.pth"), "--out_dir", os.path.join(ma_dir, "eval"),
         "--quiet", "--device", str(dev)])))
    rows = [json.loads(l) for l in open(os.path.join(ma_dir, "log.jsonl"))]
    epochs = [r for r in rows if "epoch" in r]
    timed["bank fit"] = next(r["memory_bank"]["time_s"] for r in rows if "memory_bank" in r)
    timed["epoch"] = statistics.mean(r["time_s"] for r in epochs)
    timed["n epochs"] = len(epochs)
    timed["pool"] = _views_seconds(epochs)
    timed["floor"] = timed["floor train"] + timed["floor test"]
    timed["knn total"] = timed["knn fit"] + timed["knn eval"]
    timed["MambaAlign total"] = timed["MambaAlign train"] + timed["MambaAlign eval"]
    timed["knn ratio"] = timed["knn total"] / timed["floor"]
    timed["MambaAlign ratio"] = timed["MambaAlign total"] / timed["knn total"]
    timed["MambaAlign rest"] = _recipe_less_steps(timed["MambaAlign total"], epochs)
    timed["rest ratio"] = timed["MambaAlign rest"] / timed["knn total"]
    timed["summary"] = summary
    return timed


def _recipe_less_steps(total: float, epochs: List[dict]) -> float:
    """What MambaAlign's recipe (train.py + eval.py, ``total`` seconds) takes beside its epochs' training steps
    and validations: ``total`` less the epochs' ``time_s`` (log.jsonl's rows), to which the synthetic views they
    encoded (the last ``pool_encode_s_total``) are added back. That is its bank fit, the views, model building,
    checkpoints and the eval: no faster step and no number of epochs brings the recipe below it."""
    return total - (sum(r["time_s"] for r in epochs) - _views_seconds(epochs))


def _views_seconds(epochs: List[dict]) -> float:
    """The seconds train.py spent encoding its synthetic views (log.jsonl's epoch rows keep a running total)."""
    return max((r.get("pool_encode_s_total", 0.0) for r in epochs), default=0.0)


def _spread(values: List[float], fmt: str, unit: str = "") -> str:
    """The median of ``values``, with their range where there is more than one: "4.00x (2.50-5.00x)"."""
    med = format(statistics.median(values), fmt) + unit
    if len(values) == 1:
        return med
    return f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)}{unit})"


def bench_fit(args) -> None:
    """One class: the knn fit and eval, MambaAlign's bank fit, epochs and eval, each beside the bare backbone pass
    over the same images (and that pass through the stacked network, its norms not folded: what the folding
    gains, in the same run); then the ratios the speed goals are stated in. ``--fit_runs N`` repeats the whole
    sequence N times, interleaved (floor, knn, MambaAlign, then again), and shows each phase's median with its
    range, each run's own ratios, and their median: on a shared machine one run's ratios move by 10-15 %."""
    from datasets import build_dataset, default_aux_ch
    if args.fit_runs < 1:
        raise SystemExit(f"--fit_runs must be at least 1, got {args.fit_runs}")
    dev = args.device
    aux_ch = default_aux_ch(args.dataset) if args.aux_ch is None else args.aux_ch
    kw = {"seed": args.data_seed} if args.dataset == "synthetic" else {}
    if args.dataset == "synthetic" and args.train_images:
        kw["counts"] = {"train": args.train_images}
    train_ds = build_dataset(args.dataset, args.data_root, args.object, "train", args.img_size, aux_ch, **kw)
    test_ds = build_dataset(args.dataset, args.data_root, args.object, "test", args.img_size, aux_ch, **kw)
    common = ["--dataset", args.dataset, "--object", args.object, "--img_size", str(args.img_size), "--aux_ch",
              str(aux_ch), "--quiet", "--device", str(dev)]
    common += ["--data_root", args.data_root] if args.data_root else []
    common += ["--data_seed", str(args.data_seed)] if args.dataset == "synthetic" else []
    if args.dataset == "synthetic" and args.train_images:
        common += ["--synthetic_train", str(args.train_images)]
    out = os.path.join(args.out_dir, f"{args.dataset}_{args.object}")
    runs = []
    for r in range(args.fit_runs):
        if args.fit_runs > 1:
            print(f"run {r + 1} of {args.fit_runs} ...", flush=True)
        runs.append(_fit_once(args, train_ds, test_ds, common, out))
    n_train, n_test = len(train_ds), len(test_ds)
    col = lambda key, fmt=".1f": _spread([t[key] for t in runs], fmt)
    per = lambda key, n: _spread([n / t[key] for t in runs], ".1f")
    vs = lambda key, base, what: f"{_spread([t[key] / t[base] for t in runs], '.2f', 'x')} {what}".rstrip()
    table = [
        ["bare backbone pass (train + test images)", col("floor"), per("floor", n_train + n_test), "1.00x"],
        ["the same pass, norms not folded (the stacked network)", col("stacked"), per("stacked", n_train + n_test),
         vs("stacked", "floor", "")],
        ["knn fit (train.py --model knn)", col("knn fit"), per("knn fit", n_train),
         vs("knn fit", "floor train", "train pass")],
        ["knn eval (eval.py)", col("knn eval"), per("knn eval", n_test), vs("knn eval", "floor test", "test pass")],
        ["MambaAlign bank fit", col("bank fit"), "", vs("bank fit", "floor train", "train pass")],
        ["MambaAlign synthetic views encoded (all)", col("pool"), "", ""],
        [f"MambaAlign epoch (mean of {runs[-1]['n epochs']})", col("epoch", ".2f"), per("epoch", n_train),
         vs("epoch", "floor train", "train pass")],
        ["MambaAlign train.py (all)", col("MambaAlign train"), "", ""],
        ["MambaAlign eval (eval.py)", col("MambaAlign eval"), per("MambaAlign eval", n_test),
         vs("MambaAlign eval", "floor test", "test pass")],
        ["MambaAlign train + eval less the epochs' steps and validations", col("MambaAlign rest"), "", ""],
    ]
    how = "one run" if len(runs) == 1 else f"median (range) of {len(runs)} interleaved runs"
    print_table(f"fit on {args.dataset}/{args.object} at {args.img_size}px on {_where(dev)}: {n_train} train and "
                f"{n_test} test images, MambaAlign {args.epochs} epochs (train.py defaults otherwise); {how}",
                ["phase", "seconds", "images/s", "vs bare backbone"], table)
    if len(runs) > 1:
        print_table("each run's own ratios", ["run", "floor s", "knn fit + eval s", "knn / floor",
                                              "MambaAlign train + eval s", "MambaAlign / knn"],
                    [[str(i + 1), f"{t['floor']:.1f}", f"{t['knn total']:.1f}", f"{t['knn ratio']:.2f}x",
                      f"{t['MambaAlign total']:.1f}", f"{t['MambaAlign ratio']:.2f}x"] for i, t in enumerate(runs)])
    s = runs[-1]["summary"]["overall"]
    same = all(t["summary"]["overall"] == runs[0]["summary"]["overall"] for t in runs)
    print(f"knn fit + eval = {col('knn total')} s = {_spread([t['knn ratio'] for t in runs], '.2f', 'x')} the bare "
          f"backbone pass over the same train and test images: {col('floor')} s")
    print(f"MambaAlign train + eval = {col('MambaAlign total')} s = "
          f"{_spread([t['MambaAlign ratio'] for t in runs], '.2f', 'x')} the knn fit + eval (image AUROC "
          f"{s['image_auroc']:.4f}, AUPRO 0.05 {s['aupro_0.05']:.4f}"
          + ("" if same else ", the last run's; the runs' results differ") + ")")
    print(f"MambaAlign train + eval less its epochs' training steps and validations = {col('MambaAlign rest')} s = "
          f"{_spread([t['rest ratio'] for t in runs], '.2f', 'x')} the knn fit + eval (its bank fit, synthetic "
          f"views, model building, checkpoints and eval: what no faster step or fewer epochs can remove)")


# ----------------------------------------------------------------------------------------------------
# decision: does the threshold stored at training hold on the test split's parts?
# ----------------------------------------------------------------------------------------------------

def _rates_at(eval_dir: str, threshold: float):
    """(share of good, share of anomalous) test images of eval.py's eval_results.csv whose score_logit exceeds
    ``threshold``."""
    import csv
    with open(os.path.join(eval_dir, "eval_results.csv")) as fh:
        res = [(float(r["score_logit"]), int(r["label"])) for r in csv.DictReader(fh)]
    rate = lambda lab: (sum(s > threshold for s, y in res if y == lab) / n) if (n := sum(y == lab for _, y in res)) \
        else float("nan")
    return rate(0), rate(1)


def _heldout_only_threshold(ckpt_path: str, target_fpr: Optional[float] = None) -> float:
    """The threshold train.py stored before every train normal took part: the quantile of the held-out normals'
    clean scores alone (for the before/after comparison), at ``target_fpr`` or the checkpoint's --target_fpr."""
    import json
    from torch.utils.data import DataLoader
    from datasets import build_dataset
    from datasets.synthesis import AnomalySynthesizer, SynthesisDataset
    from engine import load_checkpoint, load_model
    from metrics import threshold_at_fpr
    ckpt = load_checkpoint(ckpt_path)
    model, a = load_model(ckpt), ckpt["args"]
    kw = {"seed": a.get("data_seed", 0)} if a["dataset"] == "synthetic" else {}
    base = build_dataset(a["dataset"], a["data_root"], a["object"], "train", a["img_size"], model.config.aux_ch,
                         progress=False, **kw)
    held = json.load(open(os.path.join(os.path.dirname(ckpt_path), "splits.json")))["validation"]
    idx = [i for i, r in enumerate(base.records) if r.rgb in set(held)]
    clean = SynthesisDataset(base, AnomalySynthesizer(base.aux_kind if model.config.aux_ch else None, synth_prob=0.0),
                             indices=idx)
    scores = []
    with torch.no_grad():
        for b in DataLoader(clean, batch_size=8):
            scores += model(b["rgb"], b.get("aux"))["score_logit"].tolist()
    return threshold_at_fpr(scores, a.get("target_fpr", 0.05) if target_fpr is None else target_fpr)


def _recalibrated_rates(args, ckpt_path: str, root: str, obj: str, out: str, n_cal: int):
    """--calibrate_on the first ``n_cal`` good test parts (by name) through predict.py, then the share of the
    OTHER good test parts and of every anomalous one that the new threshold flags."""
    import csv
    import shutil
    import predict as predict_script
    rgb_good, ir_good = os.path.join(root, obj, "RGB", "test", "good"), os.path.join(root, obj, "Infrared", "test",
                                                                                     "good")
    from datasets.base import natural_key
    names = sorted(os.listdir(rgb_good), key=natural_key)
    cal_rgb, cal_ir = os.path.join(out, "line_good", "RGB"), os.path.join(out, "line_good", "IR")
    shutil.rmtree(os.path.join(out, "line_good"), ignore_errors=True)
    os.makedirs(cal_rgb)
    os.makedirs(cal_ir)
    for n in names[:n_cal]:
        shutil.copy(os.path.join(rgb_good, n), cal_rgb)
        shutil.copy(os.path.join(ir_good, n), cal_ir)
    new = os.path.join(out, "line_calibrated.pth")
    if os.path.exists(new):
        os.remove(new)
    predict_script.main(predict_script.get_args_parser().parse_args(
        ["--checkpoint", ckpt_path, "--calibrate_on", cal_rgb, "--aux_dir", cal_ir, "--save_checkpoint", new,
         "--min_images", str(n_cal), "--quiet"]))
    pred = os.path.join(out, "line_predict")
    shutil.rmtree(pred, ignore_errors=True)
    predict_script.main(predict_script.get_args_parser().parse_args(
        ["--checkpoint", new, "--input", os.path.join(root, obj, "RGB", "test"), "--aux_dir",
         os.path.join(root, obj, "Infrared", "test"), "--out_dir", pred, "--quiet"]))
    with open(os.path.join(pred, "predictions.csv")) as fh:
        rows = list(csv.DictReader(fh))
    held_back = {os.path.join(rgb_good, n) for n in names[n_cal:]}
    good = [r for r in rows if r["path"] in held_back]
    bad = [r for r in rows if os.sep + "good" + os.sep not in r["path"]]
    rate = lambda rs: sum(r["decision"] == "1" for r in rs) / len(rs)
    return rate(good), rate(bad)


def bench_decision(args) -> None:
    """MulSen-AD classes at the recipe, --seeds seeds: the stored threshold's share of good and anomalous test
    parts flagged, with the held-out-only threshold of before beside it, and after recalibrating on 5 good test
    parts (measured on the other good parts and every anomalous one)."""
    import json
    import eval as eval_script
    from datasets import list_objects
    root = args.mulsen_root
    if not root or not os.path.isdir(root):
        raise SystemExit(f"--mulsen_root {root}: folder not found")
    rows, pooled = [], {k: [] for k in ("before", "after", "line")}
    t_all = time.time()
    for obj in list_objects("mulsenad", root):
        for seed in range(args.seeds):
            out = os.path.join(args.out_dir, obj, f"seed{seed}")
            _train(["--dataset", "mulsenad", "--data_root", root, "--object", obj, "--aux_ch", "1", "--img_size",
                    str(args.img_size), "--epochs", str(args.epochs), "--seed", str(seed), "--out_dir", out,
                    "--quiet"])
            ckpt = os.path.join(out, "best_checkpoint.pth")
            summary = eval_script.main(eval_script.get_args_parser().parse_args(
                ["--checkpoint", ckpt, "--out_dir", os.path.join(out, "eval"), "--quiet"]))
            thr_before = _heldout_only_threshold(ckpt, 0.05)
            d = summary["decision"][obj]
            before = _rates_at(os.path.join(out, "eval"), thr_before)
            after = (d["test_fpr"], d["test_tpr"])
            line = _recalibrated_rates(args, ckpt, root, obj, out, 5)
            for k, v in (("before", before), ("after", after), ("line", line)):
                pooled[k].append(v)
            rows.append([obj, str(seed), f"{summary['overall']['image_auroc']:.4f}",
                         f"{thr_before:.2f}: {before[0]:.2f} / {before[1]:.2f}",
                         f"{d['threshold']:.2f}: {after[0]:.2f} / {after[1]:.2f}", f"{line[0]:.2f} / {line[1]:.2f}"])
            with open(os.path.join(args.out_dir, "decision.json"), "w") as fh:
                json.dump({"rows": rows, "pooled": pooled}, fh, indent=1)
    mean = lambda k, i: statistics.mean(v[i] for v in pooled[k])
    rows.append(["pooled", f"{len(pooled['after'])} runs", "", f"{mean('before', 0):.2f} / {mean('before', 1):.2f}",
                 f"{mean('after', 0):.2f} / {mean('after', 1):.2f}", f"{mean('line', 0):.2f} / {mean('line', 1):.2f}"])
    print_table(f"decisions on MulSen-AD test parts at {args.img_size}px, {args.epochs} epochs, seeds "
                f"0..{args.seeds - 1}; cells: threshold: share of good / of anomalous test parts flagged; "
                f"{(time.time() - t_all) / 60:.1f} min",
                ["class", "seed", "image AUROC", "held-out only (before)", "held-out + bank LOO (stored)",
                 "after --calibrate_on 5 good (other 5 good / anomalous)"], rows)


# ----------------------------------------------------------------------------------------------------
# coreset: the memory bank's greedy selection at scale
# ----------------------------------------------------------------------------------------------------

def bench_coreset(args) -> None:
    """greedy_coreset (exact) beside greedy_coreset_ref (the former algorithm, one pass over every row per pick) on
    clustered Gaussian rows; 4096 picks after the default 64-dimensional projection. The reference runs on the
    smaller case only: at 230 k rows it runs for many minutes on 2 cores."""
    from knn import greedy_coreset, greedy_coreset_ref
    rows = []
    for n, d, with_ref in ((60_000, 152, True), (230_000, 1000, False)):
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(64, d, generator=g) * 3
        x = centers[torch.randint(64, (n,), generator=g)] + torch.randn(n, d, generator=g)
        dev = args.device
        xd = x.to(dev)
        t_fast = time_it(lambda: greedy_coreset(xd, 4096), 1, warmup=0, device=dev)
        same, t_ref = "", None
        if with_ref:
            t0 = time.perf_counter()
            ref = greedy_coreset_ref(x, 4096)
            t_ref = time.perf_counter() - t0
            same = "yes" if torch.equal(greedy_coreset(xd, 4096), ref) else "NO"
        rows.append([f"{n} x {d}", f"{t_fast:.2f}", f"{t_ref:.2f}" if t_ref else "-",
                     f"{t_ref / t_fast:.1f}x" if t_ref else "-", same or "-"])
    print_table(f"greedy coreset of 4096 rows on {_where(args.device)} (one run each)",
                ["rows x dims", "greedy_coreset s", "greedy_coreset_ref s", "speed-up", "same rows"], rows)


# ----------------------------------------------------------------------------------------------------
# pointcloud: what geometry costs to read
# ----------------------------------------------------------------------------------------------------

def bench_pointcloud(args) -> None:
    """Load time per sample of an MVTec 3D-AD tree (normals, FPFH) raw and after prepare_data.py, and FPFH time per
    cloud (an organised cloud, a mesh), on synthetic objects written at --cloud_size px."""
    import tempfile
    import prepare_data
    import pointcloud
    from datasets import build_dataset
    from datasets.synthetic import height_mesh, render_sample, write_mvtec3d_tree, write_stl
    size, n = args.cloud_size, 4
    rows = []
    with tempfile.TemporaryDirectory() as d:
        raw, prep = os.path.join(d, "raw"), os.path.join(d, "prep")
        write_mvtec3d_tree(raw, "disc", size, counts={"train": n, "test_good": 1, "test_defect": 1})
        t0 = time.perf_counter()
        prepare_data.prepare_mvtec3d(raw, prep, progress=False, fpfh=True, dist=1.0)
        n_xyz = n + 1 + 5
        rows.append([f"prepare_data.py --fpfh (plane, normals, FPFH) per {size}x{size} xyz file",
                     f"{(time.perf_counter() - t0) / n_xyz:.3f}"])
        for root, what in ((raw, "raw"), (prep, "prepared")):
            for aux_ch, kind in ((3, "normals"), (33, "FPFH")):
                ds = build_dataset("mvtec3d", root, "disc", "train", args.img_size, aux_ch, progress=False)
                t0 = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                rows.append([f"load one sample, {what} tree, {kind} (to {args.img_size} px)",
                             f"{(time.perf_counter() - t0) / len(ds):.3f}"])
        s = render_sample(np.random.default_rng(0), size, "disc")
        from datasets.synthetic import depth_to_xyz
        xyz = depth_to_xyz(s["depth"])
        pts = xyz.reshape(-1, 3)
        rows.append([f"FPFH of an organised {size}x{size} cloud ({len(pts)} points)",
                     f"{time_it(lambda: pointcloud.fpfh_features(pts), 3, warmup=1):.3f}"])
        v, f = height_mesh(s["depth"].max() - s["depth"], s["object_mask"])
        stl = os.path.join(d, "part.stl")
        write_stl(stl, v, f)
        rows.append([f"read an STL mesh ({len(f)} triangles) and sample {pointcloud.MESH_POINTS} points",
                     f"{time_it(lambda: pointcloud.read_points(stl), 3, warmup=1):.3f}"])
        mesh_pts = pointcloud.read_points(stl)
        rows.append([f"FPFH of those {len(mesh_pts)} points",
                     f"{time_it(lambda: pointcloud.fpfh_features(mesh_pts), 3, warmup=1):.3f}"])
    print_table(f"point clouds on {_where(torch.device('cpu'))}, synthetic disc written at {size}x{size}, median of 3 "
                f"(loads: mean over {n} samples)", ["what", "seconds"], rows)


# ----------------------------------------------------------------------------------------------------

COMMANDS = {"scan": bench_scan, "block": bench_block, "model": bench_model, "metrics": bench_metrics,
            "fit": bench_fit, "decision": bench_decision, "pointcloud": bench_pointcloud, "coreset": bench_coreset,
            "ablation": bench_ablation, "compare": bench_compare}


def get_args_parser():
    from engine import HelpFormatter
    p = argparse.ArgumentParser("bench.py", add_help=True, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("what", choices=sorted(COMMANDS) + ["all"], help="which benchmark to run")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median is shown)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores of this machine)")
    p.add_argument("--size", type=int, default=256, help="model: input size")
    p.add_argument("--presets", default="tiny,base",
                   help="model: comma-separated presets to time (the base preset compiles its long scans first: "
                        "minutes on a cold compile cache)")
    p.add_argument("--scan_backend", default="auto", choices=BACKENDS,
                   help="block, model: the selective-scan backend (auto: on CUDA mamba-ssm where it imports, "
                        "else our Triton kernels, else torch)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a data, checkpoint or file error")
    p.add_argument("--device", default="cpu",
                   help="scan, block, model: cpu, cuda or cuda:N (on CUDA the scan table adds mamba-ssm's kernel "
                        "where it imports; times are taken between device synchronisations)")
    g = p.add_argument_group("ablation (bench.py ablation)")
    g.add_argument("--dataset", default="synthetic", help="dataset family (as train.py)")
    g.add_argument("--data_root", default=None, help="dataset root (as train.py)")
    g.add_argument("--object", default="disc", help="object to train and test on")
    g.add_argument("--aux_ch", type=int, default=None, help="aux channels of the full model (default: dataset's)")
    g.add_argument("--img_size", type=int, default=128, help="training and test size")
    g.add_argument("--epochs", type=int, default=24, help="epochs per variant (the shared budget; 24 as make demo)")
    g.add_argument("--seed", type=int, default=0, help="first seed; every variant runs the same seeds")
    g.add_argument("--data_seed", type=int, default=0,
                   help="seed of the synthetic dataset (1: the dev split that design choices are made on)")
    g.add_argument("--variants", default=None, help=f"comma-separated subset of: {', '.join(ABLATIONS)}")
    g.add_argument("--out_dir", default=None,
                   help="where each run and eval go (default: runs/<command>); a benchmark run again into the "
                        "same folder replaces its runs")
    g.add_argument("--cloud_size", type=int, default=400,
                   help="pointcloud: side of the written clouds (MVTec 3D-AD: 400)")
    g.add_argument("--train_images", type=int, default=0,
                   help="fit, synthetic data: this many train images (0: the dataset's default)")
    g.add_argument("--fit_runs", type=int, default=1,
                   help="fit: run every phase this many times, interleaved, and show medians, ranges and each "
                        "run's own ratios (the machine's speed drifts between runs minutes apart)")
    g = p.add_argument_group("compare (bench.py compare; also uses --img_size, --epochs, --seeds, --out_dir)")
    g.add_argument("--mulsen_root", default="../shared/data/MulSen_AD_mini",
                   help="a MulSen-AD tree: every class in it is compared (empty string: none)")
    g.add_argument("--mvtec_root", default="../shared/data/hazelnut_toy",
                   help="an MVTec-AD-style tree (RGB only): every class in it is compared (empty string: none)")
    g.add_argument("--fpfh", type=int, default=1,
                   help="compare: 1 adds the knn FPFH rows on the synthetic objects (written as MVTec 3D-AD trees, "
                        "prepared with FPFH); 0 leaves them out")
    g.add_argument("--rows", default="all", choices=("all", "geometry"),
                   help="compare: all rows, or geometry: only the rows on the synthetic objects written as MVTec "
                        "3D-AD trees (knn fpfh, knn rgb+fpfh, MambaAlign with the normals' CNN bank and with the "
                        "FPFH bank; trees of dataset seed --data_seed)")
    g.add_argument("--objects", default=None,
                   help="compare: comma-separated synthetic objects (default: all of them)")
    g.add_argument("--seeds", type=int, default=3,
                   help="seeds per trained model (compare: on the real classes and the first synthetic object; "
                        "ablation: per variant)")
    return p


_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def main(args) -> None:
    args.out_dir = args.out_dir or f"runs/{args.what}"
    measures_memory = args.what not in ("ablation", "compare", "fit", "decision", "pointcloud", "coreset")
    if measures_memory and os.environ.get(_MMAP_ENV) is None and sys.platform.startswith("linux"):
        os.environ[_MMAP_ENV] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    n = _pin_threads(args.threads)
    from engine import resolve_device
    args.device = resolve_device(args.device)   # the same check train.py and eval.py make
    if args.device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu, cuda or cuda:N, got {args.device}")
    print(f"torch {torch.__version__}, {n} threads, python {sys.version.split()[0]}, device {_where(args.device)}")
    todo = [k for k in COMMANDS if k in ("scan", "block", "model", "metrics")] if args.what == "all" \
        else [args.what]
    for name in todo:
        COMMANDS[name](args)


if __name__ == "__main__":
    from engine import run_cli
    run_cli(main, get_args_parser())
