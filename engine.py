"""The run layer shared by train.py, eval.py and bench.py (scripts import it; it imports no script).

* The checkpoint format, one owner: ``make_checkpoint`` (what a checkpoint holds), ``save_atomic``,
  ``load_checkpoint`` (``weights_only``, every failure a one-line RunError naming the file), ``load_model``
  (rebuilds the MambaAlign or knn model a checkpoint holds), ``prepare_out_dir`` (creates --out_dir once the
  checks pass and removes temporaries a killed save left).
* The run's environment: ``resolve_device``, ``autocast_context`` (one autocast for the repo), ``dist_info``,
  ``git_revision``, ``keep_freed_memory`` (glibc's malloc keeps freed tensors' memory for the next ones),
  ``freeze_imports`` (the cycle collector leaves the imported modules' objects alone).
* Command lines: argument types that range-check numbers, ``HelpFormatter`` (defaults shown), ``run_cli`` (data,
  checkpoint, argument and file errors become one line and exit status 2).
* ``run_inference``: the loop train.py (validation) and eval.py (test) share, so both compute metrics the same way;
  ``FeatureCache``: encoded inputs of fixed samples, so a frozen backbone runs once per sample, not per epoch.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import glob
import math
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from MambaAlign import INPUT_MULTIPLE     # the stride the model needs H and W to be multiples of
from rgbx_backbone import BackboneWeightsError

__all__ = ["resolve_device", "autocast_context", "run_inference", "FeatureCache", "available_memory",
           "git_revision", "dist_info", "load_model",
           "save_atomic", "make_checkpoint", "plain", "load_checkpoint", "prepare_out_dir", "MODEL_TYPES",
           "RunError", "HelpFormatter", "keep_freed_memory", "freeze_imports", "positive_int", "nonneg_int",
           "positive_float", "nonneg_float", "probability", "fraction", "fpr_limit", "image_size", "workers",
           "resolve_workers", "loader_options", "WORKERS_HELP", "run_cli", "vis_names", "write_visualisation",
           "OnnxModel", "ONNX_FORMAT", "ONNX_META_KEYS", "Terminated", "resume_command", "write_text_atomic",
           "write_atomic", "link_atomic"]

# The model families a checkpoint can hold; its "model_type" entry names one (absent: a MambaAlign checkpoint
# or a raw MambaAlign state dict).
MODEL_TYPES = ("mambaalign", "knn")


class RunError(Exception):
    """A bad argument, checkpoint or output folder: scripts print it as one line and exit non-zero."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the scripts' docstring layout and shows every flag's default (a flag whose default is None and
    whose help already says what that means, "(default: ...)", is not given a second "(default: None)")."""

    def _get_help_string(self, action):
        if action.default is None and "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _number(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what      # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
probability = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
fpr_limit = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
image_size = _number(int, lambda v: v >= INPUT_MULTIPLE and v % INPUT_MULTIPLE == 0,
                     f"a positive multiple of {INPUT_MULTIPLE}")


def workers(text):
    """--workers: 'auto' or an integer >= 0 (see ``resolve_workers``)."""
    return text if text == "auto" else nonneg_int(text)


workers.__name__ = "'auto' or an integer >= 0"

WORKERS_HELP = ("DataLoader worker processes that read, decode, resize and synthesise samples. auto: none on CPU "
                "(they compete with the compute threads for the same cores: measured slower on 2 cores), half the "
                "cores (at most 8) on CUDA, where the CPU is otherwise idle")


def resolve_workers(value, device: torch.device) -> int:
    """The worker count --workers asks for on ``device`` ('auto': see WORKERS_HELP)."""
    if value != "auto":
        return int(value)
    return min(8, (os.cpu_count() or 2) // 2) if device.type == "cuda" else 0


def loader_options(args, device: torch.device) -> dict:
    """DataLoader keywords every script uses: its worker count, pinned memory where a GPU reads the batches."""
    return {"num_workers": resolve_workers(args.num_workers, device), "pin_memory": device.type == "cuda"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (so ``finally`` blocks run: a save in progress removes its
    temporary file) and reported like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


# glibc mallopt parameters and the values keep_freed_memory sets: no block comes from a fresh mapping of its own
# (M_MMAP_MAX 0: every block from the heap, whatever its size; the threshold below only matters where a later
# call allows mappings again); freed memory stays in the process up to 1 GiB at the heap's top; the heap grows
# 256 MiB at a time; every thread allocates from that one heap (M_ARENA_MAX 1).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -3, -4, -8
MALLOC_SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 256 << 20,
                   _M_ARENA_MAX: 1}
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_ARENA_ENV = "MALLOC_ARENA_MAX"     # set by some container images on its own: then only the arena count is left


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse the memory of freed tensors instead of returning it to the kernel; True where it
    did. PyTorch's CPU tensors come from malloc, and glibc by default serves blocks over a threshold (128 KiB,
    rising to at most 32 MiB) with a new mapping each and gives freed memory at the heap's top back: every
    forward and backward pass that frees and allocates activations of a few MiB then faults each new page in
    again. The cost is the kernel's: on the project's 2-core VM, `bench.py fit` on MulSen-AD capsule spent 58 s
    of 250 s CPU time in the kernel without this and 13 s with it, and the bare backbone pass ran 2.7x faster;
    results do not change (the same arithmetic on the same values).

    Blocks over 32 MiB (glibc's upper bound for the mapping threshold) used to keep their own mappings: the
    backbone's stage-2 activations at batch 8 and 256 px are 50 MB each (and timm's "same" padding copies them),
    so the bare backbone pass over 64 images still faulted 0.2-0.7 M pages in each time (3.6-9.5 s of system time
    over 5 passes). M_MMAP_MAX 0 serves those from the heap too: the pass ran in 1.2 s instead of 1.6-2.4 s, with
    no page faults once the heap had grown, and `bench.py fit` on capsule spent 4.0 s in the kernel instead of
    16.2-16.6 s (docs/profile.md). Where the heap cannot grow (no room beside it) glibc still maps memory as its
    fallback, so no allocation fails for it.

    Threads (eval.py computes its metric subsets in a few) would otherwise each get an arena of their own, fresh
    memory outside these settings, faulted in again by every new thread: eval.py's first (and only) summary of
    capsule took 0.93-1.23 s in threads against 0.81 s in one thread, and 0.58-0.65 s with M_ARENA_MAX 1, which
    keeps every thread on the one heap (a knn fit ran as fast either way).

    The price is that the process keeps up to about 1 GiB of freed memory at the heap's top (and freed blocks
    below the top) for reuse. The scripts call it at start; a notebook can too. A no-op (False) outside glibc, and
    where the environment sets glibc's own MALLOC_*_ variables (the user's choice wins); a MALLOC_ARENA_MAX in the
    environment leaves the arena count alone and nothing else."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in _MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version         # glibc only: other C libraries' mallopt (if any) differ
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = {p: v for p, v in MALLOC_SETTINGS.items() if not (p == _M_ARENA_MAX and _ARENA_ENV in os.environ)}
    return all(mallopt(param, value) == 1 for param, value in settings.items())


def freeze_imports() -> int:
    """Move every object Python's cycle collector tracks now to its permanent generation (``gc.freeze``) and
    return how many it holds: called once per process after the imports (about 320 k objects with torch, numpy
    and the scripts imported), so the full collections that a run's allocations trigger no longer traverse them.
    Each such collection took 0.16-0.24 s, about once per knn fit + eval on MulSen-AD capsule (3.4 s on 2 cores);
    with the imports frozen 0.02-0.06 s. Nothing changes but the time: frozen objects are still freed when their
    last reference goes, only a reference cycle among them would never be (none was unreachable after the
    imports: ``gc.collect()`` found 0). The scripts call it through :func:`run_cli`; it freezes only while
    nothing is frozen, so later calls (a second run_cli in one process) leave later objects to the collector."""
    if not gc.get_freeze_count():
        gc.freeze()
    return gc.get_freeze_count()


def run_cli(main: Callable, parser: argparse.ArgumentParser, argv=None, on_interrupt: Optional[Callable] = None):
    """Parse the arguments and run ``main``; a data, checkpoint, argument or file-system error becomes one line
    on stderr and exit status 2 (``--debug`` shows the traceback instead). Ctrl-C (SIGINT) and SIGTERM stop the
    run where it is (files being written are left whole or not at all) with one line, plus what
    ``on_interrupt(args)`` says (how to resume), and exit status 130 / 143."""
    import signal
    from datasets import DatasetError
    args = parser.parse_args(argv)
    keep_freed_memory()
    freeze_imports()
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:         # not the main thread (a notebook's worker thread): leave SIGTERM alone
        pass
    try:
        return main(args)
    except (RunError, DatasetError, BackboneWeightsError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{parser.prog}: error: {text}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        if getattr(args, "debug", False):
            raise
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
        hint = on_interrupt(args) if on_interrupt else ""
        print(f"{parser.prog}: {what}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def resume_command(script: str, args, extra: str = "") -> str:
    """The command line that continues an interrupted run: the script, the flags the user gave (from sys.argv
    when it ran this script) and ``extra``."""
    argv = sys.argv[1:] if os.path.basename(sys.argv[0]) == script else []
    import shlex
    kept, skip = [], False
    for a in argv:                          # drop an earlier --resume VALUE: the hint adds its own
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if not a.startswith("--resume="):
            kept.append(a)
    return " ".join(["python", script] + [shlex.quote(a) for a in kept] + ([extra] if extra else []))


def load_checkpoint(path: str, map_location="cpu"):
    """Read a checkpoint with ``weights_only=True`` (plain values and tensors only). Every failure is a RunError
    that names the file: missing, not a checkpoint, truncated, or holding code objects (refused)."""
    if os.path.isdir(path):
        raise RunError(f"checkpoint {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise RunError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():     # torch's notes on foreign pickles: the errors below say what matters
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch wraps every weights-only failure in one message; "Unsupported global" is the one that means the
        # file names Python objects (classes, functions) to build; anything else is bytes that are no pickle.
        if "Unsupported global" in str(exc) or _pickle_builds_objects(path):
            raise RunError(f"refused to load {path}: it holds Python objects other than tensors and plain values "
                           f"(loading it would run code); MambaAlign checkpoints never do") from None
        raise RunError(f"{path} is not a PyTorch checkpoint (not a pickle torch can read: "
                       f"{_weights_only_reason(exc)})") from None
    except Exception as exc:  # on corrupt bytes torch.load can raise almost anything (IndexError, KeyError, ...)
        raise RunError(f"{path} is not a PyTorch checkpoint this can read (truncated or another format: "
                       f"{_first_line(exc)})") from None


def _pickle_builds_objects(path: str) -> bool:
    """Whether a plain pickle file (not torch's zip format) names Python callables to build objects with: read
    with pickletools, which only lists the opcodes and runs nothing. Only a whole pickle (every opcode valid, up
    to its STOP) counts: random bytes often begin with such an opcode (a 1 in 60 chance for 4 KiB of them) and
    are no pickle at all."""
    import pickletools
    builds = False
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")      # pickletools warns about escapes in the strings of random bytes
            size = os.fstat(fh.fileno()).st_size
            while fh.tell() < size:          # torch's legacy format is several pickles in a row
                stopped = False
                for op, _, _ in pickletools.genops(fh):
                    builds |= op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX")
                    stopped = op.name == "STOP"
                if not stopped:
                    return False
    except Exception:  # pickletools raises ValueError and others on bytes that are no pickle
        return False
    return builds


def _weights_only_reason(exc: BaseException) -> str:
    """The unpickler's own reason inside torch's long weights-only message (e.g. "Unsupported operand 80")."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = text.split("Check the documentation", 1)[0]
    return " ".join(text.split())[:200] or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def prepare_out_dir(path: str) -> List[str]:
    """Create ``--out_dir`` (call it once every check has passed), check that it is writable, and delete the
    temporary checkpoint files (``*.pth.tmp.<pid>``) a killed save left there; returns their paths."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise RunError(f"--out_dir {path} is not writable: {exc}") from None
    stale = sorted(glob.glob(os.path.join(glob.escape(path), "*.pth.tmp.*")))
    for p in stale:
        os.remove(p)
    return stale


def plain(value):
    """A value safe for ``weights_only`` loading and JSON: numbers, strings, booleans and None as they are, anything
    else as its string."""
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def make_checkpoint(model, config: dict, args: dict, metrics: Optional[dict] = None, **training) -> dict:
    """The one checkpoint format. Every checkpoint: ``model_type`` (see MODEL_TYPES), ``model`` (state dict),
    ``config`` (the model's config as a plain dict), ``args`` (the run's arguments as plain values) and
    ``metrics``. A training checkpoint adds its resumable state as keyword arguments (optimizer, scheduler,
    scaler, epoch, step, batches_done, best, rng)."""
    ckpt = {"model_type": getattr(model, "model_type", "mambaalign"), "model": model.state_dict(),
            "config": config, "args": {k: plain(v) for k, v in args.items()}, "metrics": metrics or {}}
    ckpt.update(training)
    return ckpt


def write_atomic(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename: a reader never sees a half-written file,
    and the file it replaces stays whole until then. A failed write (a full disk; torch's serializer raises
    RuntimeError) is a RunError naming the file and the free space; an interrupted (Ctrl-C) or failed write
    leaves no temporary behind."""
    tmp = f"{path}.tmp.{os.getpid()}"
    existed = os.path.exists(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        raise RunError(f"could not write {path}: {reason} ({_free_space(path)})"
                       + (f"; the previous {os.path.basename(path)} is unchanged" if existed else "")) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path: str) -> None:
    """torch.save through ``write_atomic``: checkpoints are whole or not there."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def link_atomic(src: str, path: str) -> None:
    """``path`` becomes a second name of the file ``src`` (a hard link: the bytes are not written again), or a copy
    of it where the file system has no hard links; through ``write_atomic``, so ``path`` is whole or unchanged.
    Safe beside ``save_atomic``: a later save to either name renames a new file over that name and leaves the
    other one's bytes as they were."""
    def write(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    write_atomic(path, write)


def _free_space(path: str) -> str:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
        return f"{st.f_bavail * st.f_frsize / 2 ** 20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


def load_model(ckpt, config=None, source: str = "checkpoint"):
    """Rebuild the model a loaded checkpoint holds: a MambaAlign (training checkpoint, or a raw state dict with
    ``config``) or a fitted knn baseline (``model_type: "knn"``). Returns it in eval mode."""
    if not isinstance(ckpt, dict):
        raise RunError(f"{source} holds a {type(ckpt).__name__}, not a checkpoint or state dict")
    kind = ckpt.get("model_type", "mambaalign")
    if kind not in MODEL_TYPES:
        raise RunError(f"{source}: unknown model_type {kind!r}; this version reads {MODEL_TYPES}")
    try:
        if kind == "knn":
            from knn import PatchKNN
            return PatchKNN.from_loaded(ckpt, source=source).eval()
        from MambaAlign import MambaAlign
        return MambaAlign.from_loaded(ckpt, config=config, source=source).eval()
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise RunError(f"{source} does not hold a model this version can rebuild: {_first_line(exc)}") from None


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
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


def vis_names(paths: List[str]) -> List[str]:
    """One PNG name per input path, unique within the list: the path relative to the paths' common folder, its
    separators as '__' (``hole/0.png`` -> ``hole__0.png``). Where two paths still give one name (only when names
    hold '__' themselves: ``a__b/0.png`` and ``a/b__0.png``), each such name gets a short hash of its full path."""
    import hashlib
    keys = [p.split("://", 1)[-1] for p in paths]
    try:
        root = os.path.commonpath([os.path.dirname(k) for k in keys]) if len(keys) > 1 else os.path.dirname(keys[0])
    except ValueError:          # absolute and relative paths mixed
        root = ""
    stems = [os.path.splitext(os.path.relpath(k, root) if root else k)[0].replace(os.sep, "__").replace("/", "__")
             for k in keys]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [(s if counts[s] == 1 else f"{s}_{hashlib.sha1(p.encode()).hexdigest()[:8]}") + ".png"
            for s, p in zip(stems, paths)]


def write_visualisation(out_dir: str, name: str, anomaly_map: np.ndarray, rgb: torch.Tensor,
                        aux: Optional[torch.Tensor] = None, mask: Optional[np.ndarray] = None) -> None:
    """vis/heatmaps/<name>: the anomaly map (fixed [0, 1] range, viridis). vis/overlays/<name>: the RGB image
    (``rgb``: (3, H, W) ImageNet-normalised) with the map blended in and the ground-truth contour in red where
    ``mask`` is given, the aux modality beside it."""
    from PIL import Image
    from scipy import ndimage
    from datasets.transforms import aux_to_image, colormap, denormalize_rgb
    hdir, odir = os.path.join(out_dir, "vis", "heatmaps"), os.path.join(out_dir, "vis", "overlays")
    os.makedirs(hdir, exist_ok=True)
    os.makedirs(odir, exist_ok=True)
    heat = colormap(np.asarray(anomaly_map))
    _save_png(Image.fromarray(heat), os.path.join(hdir, name))
    img = (denormalize_rgb(rgb.float().cpu()).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    over = (0.55 * img + 0.45 * heat).astype(np.uint8)
    if mask is not None and mask.any():
        over[mask & ~ndimage.binary_erosion(mask)] = (255, 0, 0)
    panels = [over] + ([aux_to_image(aux.float().cpu())] if aux is not None else [])
    _save_png(Image.fromarray(np.concatenate(panels, axis=1)), os.path.join(odir, name))


def _save_png(image, path: str) -> None:
    """A PNG through ``write_atomic``: an interrupted run leaves no half-written picture."""
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def write_text_atomic(path: str, text: str) -> None:
    """A text file (CSV, JSON, summary) through ``write_atomic``: whole or not at all, a failed write named."""
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    write_atomic(path, write)


# What export.py writes into an ONNX file's metadata and predict.py reads back (one owner of the format).
ONNX_FORMAT = "mambaalign-onnx-1"
ONNX_META_KEYS = ("format", "model_type", "img_size", "aux_ch", "dataset", "score_description", "source_checkpoint")


class OnnxModel:
    """An exported model (export.py) run by onnxruntime on the CPU, called like the PyTorch models:
    ``model(rgb, aux=None)`` -> {"anomaly_map" (B, 1, H, W), "seg_logits", "score_logit" (B,), "score" (B,)}
    as torch tensors. ``spec`` holds what the file's metadata says about its inputs; ``threshold`` the stored
    decision threshold (NaN: none)."""

    def __init__(self, path: str):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RunError(f"running {path} needs onnxruntime, which does not import ({exc}): pip install "
                           f"onnxruntime") from None
        if not os.path.isfile(path):
            raise RunError(f"ONNX file not found: {path}")
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise RunError(f"{path} is not a readable ONNX model ({_first_line(exc)})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != ONNX_FORMAT:
            raise RunError(f"{path} was not written by this version's export.py (metadata format "
                           f"{meta.get('format')!r}, expected {ONNX_FORMAT!r})")
        self.spec = {"img_size": int(meta["img_size"]), "aux_ch": int(meta["aux_ch"]),
                     "dataset": meta.get("dataset") or None, "model_type": meta["model_type"], "onnx": True}
        self.model_type, self.score_description = meta["model_type"], meta.get("score_description", "")
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.threshold = float(self.session.run(["threshold"], self._feeds(
            torch.zeros(1, 3, self.spec["img_size"], self.spec["img_size"]),
            torch.zeros(1, self.spec["aux_ch"], self.spec["img_size"], self.spec["img_size"])))[0].reshape(-1)[0])

    def _feeds(self, rgb, aux):
        feeds = {"rgb": rgb.detach().float().cpu().numpy()}
        if "aux" in self.inputs:
            if aux is None:
                raise ValueError("this ONNX model takes an aux input")
            feeds["aux"] = aux.detach().float().cpu().numpy()
        return feeds

    def to(self, device):
        return self

    def eval(self):
        return self

    def __call__(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        seg, logit = self.session.run(["seg_logits", "score_logit"], self._feeds(rgb, aux))
        seg, logit = torch.from_numpy(seg), torch.from_numpy(logit)
        return {"seg_logits": seg, "anomaly_map": torch.sigmoid(seg), "score_logit": logit,
                "score": torch.sigmoid(logit)}


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated: free GPU memory on CUDA, MemAvailable on Linux; None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class FeatureCache:
    """What ``MambaAlign.encode`` returns for a fixed set of samples (backbone features, the memory bank's maps and
    scores), with their labels and masks, kept so that a frozen backbone and the bank search run once per sample
    instead of once per epoch. train.py keeps its fixed synthetic training views (``--synth_pool``) and the
    validation views here; ``batch(rows)`` gives back what ``MambaAlign.forward(enc=...)`` takes.

    Features are stored in float16: it halves the cache, and its rounding (2^-11 relative) is far below the
    features' own variation; everything else in float32. Rows are allocated once, from the first batch's shapes
    (``rows`` in all), on ``device`` (pinned CPU memory where a GPU will read it)."""

    FEATURE_DTYPE = torch.float16

    def __init__(self, rows: int, device: torch.device = torch.device("cpu"), pin: bool = False):
        self.n, self.device, self.pin = rows, device, pin
        self.data: Optional[Dict[str, object]] = None
        self.filled = 0
        self.strings: Dict[str, List[str]] = {k: [] for k in ("path", "defect", "object")}

    @staticmethod
    def bytes_per_row(feature_shapes, n_modalities: int, size, has_bank: bool) -> int:
        """Bytes one sample takes: ``feature_shapes`` (C, h, w) per stored feature map, ``n_modalities`` bank maps
        at stride 8 (and scores), the mask at ``size`` (H, W)."""
        H, W = size
        feats = sum(c * h * w for c, h, w in feature_shapes) * torch.finfo(FeatureCache.FEATURE_DTYPE).bits // 8
        bank = 4 * n_modalities * ((H // 8) * (W // 8) + 1) if has_bank else 0
        return feats + bank + H * W + 64

    def _alloc(self, shape, dtype):
        t = torch.empty((self.n,) + tuple(shape), dtype=dtype, device=self.device)
        return t.pin_memory() if self.pin else t

    def add(self, enc: Dict[str, object], batch: Dict[str, object]) -> None:
        """Store one batch: ``enc`` from ``MambaAlign.encode``, ``batch`` the sample dicts' batch (mask, label,
        and where present index, aux_present, path, defect, object)."""
        feats = [t for pair in enc["feats"] for t in pair]
        B = feats[0].shape[0]
        if self.filled + B > self.n:
            raise ValueError(f"FeatureCache holds {self.n} rows, got {self.filled + B}")
        if self.data is None:
            d: Dict[str, object] = {"feats": [None if t is None else self._alloc(t.shape[1:], self.FEATURE_DTYPE)
                                              for t in feats],
                                    "size": enc["size"], "n_pairs": len(enc["feats"])}
            for k in ("bank_maps", "bank_scores", "shift"):
                d[k] = None if enc[k] is None else self._alloc(enc[k].shape[1:], torch.float32)
            d["mask"] = self._alloc(batch["mask"].shape[1:], torch.bool)
            d["label"] = self._alloc((), torch.long)
            d["index"] = self._alloc((), torch.long)
            self.data = d
        sl = slice(self.filled, self.filled + B)
        d = self.data
        for dst, t in zip(d["feats"], feats):
            if dst is not None:
                dst[sl] = t.to(dst.device, self.FEATURE_DTYPE)
        for k in ("bank_maps", "bank_scores", "shift"):
            if d[k] is not None:
                d[k][sl] = enc[k].to(d[k].device, torch.float32)
        d["mask"][sl] = batch["mask"].to(d["mask"].device) > 0.5
        d["label"][sl] = torch.as_tensor(batch["label"]).to(d["label"].device)
        d["index"][sl] = torch.as_tensor(batch.get("index", torch.full((B,), -1))).to(d["index"].device)
        for k in self.strings:
            if k in batch:
                self.strings[k].extend(list(batch[k]))
        self.filled += B

    def batch(self, rows: torch.Tensor, device: torch.device) -> Dict[str, object]:
        """The stored rows ``rows`` (1-D indices) as a batch on ``device``: ``enc`` for ``MambaAlign.forward``,
        and mask (float), label, index, plus path / defect / object where stored."""
        d = self.data
        idx = rows.to(d["label"].device)
        take = lambda t, dtype=torch.float32: None if t is None else \
            t.index_select(0, idx).to(device, non_blocking=True).to(dtype)
        flat = [take(t) for t in d["feats"]]
        enc = {"feats": [(flat[2 * i], flat[2 * i + 1]) for i in range(d["n_pairs"])],
               "bank_maps": take(d["bank_maps"]), "bank_scores": take(d["bank_scores"]), "shift": take(d["shift"]),
               "size": d["size"]}
        out = {"enc": enc, "mask": take(d["mask"]), "label": take(d["label"], torch.long),
               "index": take(d["index"], torch.long)}
        for k, v in self.strings.items():
            if v:
                out[k] = [v[i] for i in rows.tolist()]
        return out


@torch.no_grad()
def run_inference(model, loader: DataLoader, device: torch.device, amp: bool = False,
                  progress: bool = True, desc: str = "inference", keep_inputs: bool = False) -> Dict[str, object]:
    """Run `model` over `loader` in eval mode. Returns numpy arrays: score, score_logit (N,), label (N,),
    maps (N, H, W) = anomaly_map, masks (N, H, W) bool, and head_logit / bank_score (N,) where the model gives
    them (MambaAlign; for calibration); lists path, defect, object; and with ``keep_inputs`` the rgb / aux
    tensors (for visualisation)."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    out: Dict[str, List] = {k: [] for k in ("score", "score_logit", "head_logit", "bank_score", "label", "maps",
                                            "masks", "path", "defect", "object", "rgb", "aux")}
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            with autocast_context(device, amp):
                if "enc" in batch:            # a FeatureCache batch: encoded already
                    pred = model(enc=batch["enc"])
                else:
                    aux = batch.get("aux")
                    pred = model(batch["rgb"].to(device, non_blocking=True),
                                 aux.to(device, non_blocking=True) if aux is not None else None)
            out["score"].append(pred["score"].float().cpu().numpy())
            out["score_logit"].append(pred["score_logit"].float().cpu().numpy())
            for k in ("head_logit", "bank_score"):
                if k in pred:
                    out[k].append(pred[k].float().cpu().numpy())
            out["maps"].append(pred["anomaly_map"][:, 0].float().cpu().numpy())
            out["masks"].append(batch["mask"][:, 0].cpu().numpy() > 0.5)
            out["label"].append(np.asarray(torch.as_tensor(batch["label"]).cpu()))
            for k in ("path", "defect", "object"):
                out[k].extend(list(batch[k]))
            if keep_inputs:
                out["rgb"].append(batch["rgb"])
                if batch.get("aux") is not None:
                    out["aux"].append(batch["aux"])
    finally:
        model.train(was_training)
    res: Dict[str, object] = {k: np.concatenate(out[k]) for k in ("score", "score_logit", "label", "maps", "masks",
                                                                   "head_logit", "bank_score") if out[k]}
    res.update({k: out[k] for k in ("path", "defect", "object")})
    if keep_inputs:
        res["rgb"] = torch.cat(out["rgb"]) if out["rgb"] else None
        res["aux"] = torch.cat(out["aux"]) if out["aux"] else None
    return res
