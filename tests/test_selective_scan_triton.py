"""The Triton scan (backend "triton") against the sequential oracle: outputs, last state, every gradient.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 there), so these shapes stay small.
"""
import pytest
import torch

import selective_scan
from selective_scan import selective_scan_fn, selective_scan_ref

from test_selective_scan import assert_same, make_inputs, run

tri = pytest.importorskip("selective_scan_triton", reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not tri.available(torch.device(DEVICE)),
                                reason="Triton cannot run here (no GPU and TRITON_INTERPRET is not 1)")


def _on(inputs):
    return {k: v.to(DEVICE) for k, v in inputs.items()}


def _compare(inputs):
    out_r, last_r, g_r = run(inputs, "ref")
    out_t, last_t, g_t = run(inputs, "triton")
    assert_same(out_t, out_r, "out")
    assert_same(last_t, last_r, "last_state")
    for name in inputs:
        assert g_t[name] is not None, name
        assert_same(g_t[name], g_r[name], f"grad {name}")
    return out_t, last_t, g_t


# The interpreter runs every step of every program in Python: L = 257 takes tens of seconds, so it is marked slow.
CASES = [pytest.param(L, groups, "var4", marks=[pytest.mark.slow] if L > 200 else [])
         for L in (1, 7, 100, 257) for groups in (1, 2, 4)] + [(L, 1, "var3") for L in (1, 100)]


@pytest.mark.parametrize("L,groups,layout", CASES)
def test_triton_matches_ref(L, groups, layout):
    _compare(_on(make_inputs(2 if L < 200 else 1, 8, L, 4, groups, layout)))


def test_triton_strong_decay_is_finite_and_exact():
    inputs = _on(make_inputs(1, 8, 90, 8, 2, "var4", init="strong"))
    step = torch.nn.functional.softplus(inputs["delta"]) * inputs["A"][:, -1][None, :, None]
    assert step.min() < -20, "the case must reach delta*A < -20 per step"
    out, last, grads = _compare(inputs)
    assert all(torch.isfinite(t).all() for t in [out, last, *grads.values()])


def test_triton_channels_not_a_multiple_of_the_block_and_odd_dstate():
    # 12 channels in 4 groups of 3 (masked channel blocks), dstate 5 (masked state lanes), a chunk boundary
    _compare(_on(make_inputs(1, 12, 70, 5, 4, "var4")))


def test_triton_without_optional_arguments():
    inputs = _on(make_inputs(2, 8, 33, 4, 2, "var4"))
    # Without softplus the caller must pass a positive step.
    inputs["delta"] = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    inputs["delta_bias"] = 0.01 * torch.rand(8, device=DEVICE)
    for drop in ("D", "z", "delta_bias"):
        kw = {k: v for k, v in inputs.items() if k != drop}
        a = selective_scan_fn(**kw, delta_softplus=False, backend="triton")
        b = selective_scan_ref(**kw, delta_softplus=False)
        assert_same(a, b, f"without {drop}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_inputs(dtype):
    inputs = _on(make_inputs(2, 8, 40, 4, 2, "var4"))
    low = {k: v.to(dtype).requires_grad_(True) for k, v in inputs.items()}
    out = selective_scan_fn(**low, delta_softplus=True, backend="triton")
    assert out.dtype == dtype
    ref = selective_scan_ref(**{k: v.detach().float() for k, v in low.items()}, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert all(v.grad is not None and v.grad.dtype == dtype for v in low.values())


def test_triton_output_gradient_only_and_last_state_gradient_only():
    inputs = _on(make_inputs(1, 8, 20, 4, 2, "var4"))
    for which in ("out", "last"):
        res = {}
        for backend in ("ref", "triton"):
            leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
            out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
            (out.sum() if which == "out" else last.pow(2).sum()).backward()
            res[backend] = {k: v.grad for k, v in leaves.items()}
        for name in inputs:   # the oracle has no gradient (None) for inputs the loss does not reach
            want = res["ref"][name] if res["ref"][name] is not None else torch.zeros_like(inputs[name])
            assert_same(res["triton"][name], want, f"{which}: grad {name}")


def test_triton_backend_selection():
    cpu = torch.device("cpu")
    assert selective_scan.resolve_backend("auto", cpu) == "torch"        # CPU: nothing changes
    assert selective_scan.resolve_backend("triton", cpu) == "triton"      # interpreter
    with pytest.raises(RuntimeError, match="constant"):
        selective_scan.resolve_backend("triton", cpu, variable_bc=False)


def test_triton_missing_says_so(monkeypatch):
    monkeypatch.setattr(tri, "triton", None)
    with pytest.raises(RuntimeError, match="Triton is not importable"):
        selective_scan.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_scan.resolve_backend("triton", torch.device("cpu"))


def test_auto_on_cuda_prefers_mamba_then_triton(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(tri, "available", lambda device: True)
    monkeypatch.setattr(selective_scan, "_cuda_import_tried", True)
    monkeypatch.setattr(selective_scan, "_cuda_fn", None)
    monkeypatch.setattr(selective_scan, "_warned_auto_fallback", True)
    assert selective_scan.resolve_backend("auto", cuda) == "triton"
    assert selective_scan.resolve_backend("auto", cuda, variable_bc=False) == "torch"
    monkeypatch.setattr(selective_scan, "_cuda_fn", lambda *a: None)
    monkeypatch.setattr(selective_scan, "_warned_last_state", True)
    assert selective_scan.resolve_backend("auto", cuda) == "cuda"
    assert selective_scan.resolve_backend("auto", cuda, last_state_grad=True) == "triton"
    monkeypatch.setattr(tri, "available", lambda device: False)
    assert selective_scan.resolve_backend("auto", cuda, last_state_grad=True) == "torch"
