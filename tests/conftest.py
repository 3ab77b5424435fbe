"""Shared test set-up: small, CPU, deterministic.

The fast selective scan is normally compiled with torch.compile; a first compile takes minutes on a
2-core machine, so tests run its chunk functions eagerly (same code, same numbers) unless a test turns
compilation on itself (tests/test_selective_scan.py::test_compiled_matches_ref).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("MAMBAALIGN_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton scan runs on CPU tensors through Triton's interpreter (importing torch does not import
# Triton, so this is still in time). With a GPU the kernels are compiled for real, as are torch.compile's.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)

# As the scripts do (engine.run_cli): glibc keeps freed memory for the next tensors, so tests run as the scripts
# would, whichever test first goes through run_cli.
import engine  # noqa: E402

engine.keep_freed_memory()

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data (real MulSen-AD and MVTec samples); skips where a clone has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (only CI and the team's machines have it)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fit_random_bank(model, height: int, width: int, n: int = 4, seed: int = 1):
    """Give a fresh MambaAlign's memory bank something to hold: random 'normal' images (shape checks only)."""
    if model.bank is None:
        return model
    g = torch.Generator().manual_seed(seed)

    def batch():
        b = {"rgb": torch.randn(n, 3, height, width, generator=g)}
        if model.has_aux:
            b["aux"] = torch.randn(n, model.config.aux_ch, height, width, generator=g)
        return b
    model.fit_bank([batch()], [batch()])
    return model


@pytest.fixture
def fit_bank():
    """fit_bank(model, H, W): fit a fresh model's memory bank on random images."""
    return fit_random_bank


def run_script(script, argv, capsys):
    """Run a script's command line in this process as a user would (engine.run_cli): (exit code, stdout,
    stderr)."""
    from engine import run_cli
    code = 0
    try:
        run_cli(script.main, script.get_args_parser(), argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
