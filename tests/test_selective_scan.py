"""The fast `torch` selective scan against the sequential `ref` oracle: outputs, last state, every gradient."""

import pytest
import torch

import selective_scan
from selective_scan import dt_bias_init, selective_scan_fn, selective_scan_ref

# mamba-ssm's float32 tolerances (tests/ops/test_selective_scan.py).
RTOL, ATOL = 6e-4, 2e-3


def make_inputs(batch, dim, L, dstate, groups, layout, init="mamba", seed=0):
    """layout: "var4" (batch, groups, dstate, L), "var3" (batch, dstate, L), "const" (dim, dstate)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, L, generator=g)
    z = torch.randn(batch, dim, L, generator=g)
    D = torch.randn(dim, generator=g)
    if init == "mamba":
        # Mamba's initialisation: A = -exp(A_log), A_log = log(1..N); softplus(dt bias) in [1e-3, 1e-1].
        A = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
        delta_bias = dt_bias_init(dim, generator=g)
        delta = 0.1 * torch.randn(batch, dim, L, generator=g)
    else:  # strong decay: delta*A down to -20 per step for the largest |A|
        A = -torch.linspace(1.0, float(dstate), dstate).repeat(dim, 1)
        delta_bias = torch.zeros(dim)
        delta = torch.full((batch, dim, L), 20.0 / dstate) * (0.5 + torch.rand(batch, dim, L, generator=g))
        delta = torch.log(torch.expm1(delta))  # inverse softplus, so softplus(delta) is the step above
    if layout == "const":
        B, C = torch.randn(dim, dstate, generator=g), torch.randn(dim, dstate, generator=g)
    elif layout == "var3":
        B, C = torch.randn(batch, dstate, L, generator=g), torch.randn(batch, dstate, L, generator=g)
    else:
        B = torch.randn(batch, groups, dstate, L, generator=g)
        C = torch.randn(batch, groups, dstate, L, generator=g)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def run(inputs, backend, with_grad=True, seed=1):
    leaves = {k: v.clone().requires_grad_(with_grad) for k, v in inputs.items()}
    out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
    grads = {}
    if with_grad:
        g = torch.Generator().manual_seed(seed)
        w_out = torch.randn(out.shape, generator=g).to(out.device)
        w_last = torch.randn(last.shape, generator=g).to(last.device)
        ((out * w_out).sum() + (last * w_last).sum()).backward()
        grads = {k: v.grad for k, v in leaves.items()}
    return out.detach(), last.detach(), grads


def assert_same(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


CASES = [(L, groups, layout) for L in (1, 7, 100, 257) for groups in (1, 2, 4) for layout in ("var4",)]
CASES += [(L, 1, "var3") for L in (1, 7, 100, 257)] + [(L, 1, "const") for L in (1, 7, 100, 257)]


@pytest.fixture(params=["step", "chunked"])
def scan_path(request, monkeypatch):
    """Both eager implementations of the `torch` backend: _StepScan (every state in memory, the default for
    scans that fit) and _ChunkedScan (forced by a zero memory budget for _StepScan)."""
    if request.param == "chunked":
        monkeypatch.setattr(selective_scan, "STEP_SCAN_MAX_BYTES", 0)
    used = []
    for cls in (selective_scan._StepScan, selective_scan._ChunkedScan):
        monkeypatch.setattr(cls, "apply", (lambda f, name: lambda *a: used.append(name) or f(*a))(
            cls.apply, cls.__name__))
    yield request.param
    want = "_StepScan" if request.param == "step" else "_ChunkedScan"
    assert used and set(used) == {want}, f"expected only {want}, ran {used}"


@pytest.mark.parametrize("L,groups,layout", CASES)
def test_torch_matches_ref(L, groups, layout, scan_path):
    inputs = make_inputs(2, 8, L, 4, groups, layout)
    out_r, last_r, g_r = run(inputs, "ref")
    out_t, last_t, g_t = run(inputs, "torch")
    assert_same(out_t, out_r, "out")
    assert_same(last_t, last_r, "last_state")
    for name in inputs:
        assert g_r[name] is not None and g_t[name] is not None, name
        assert_same(g_t[name], g_r[name], f"grad {name}")


def test_second_backward_through_the_graph_gives_the_same_gradients(scan_path):
    """What a scan saves for backward is read, never changed: a second backward through the same graph
    (retain_graph, as gradcheck does) gets the first one's gradients bit for bit (_StepScan saves its decays;
    forming the adjoint's products in their buffer would fail this)."""
    inputs = make_inputs(2, 8, 20, 4, 2, "var4")
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend="torch")
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum() + last.square().sum()
    first = torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)
    second = torch.autograd.grad(loss, list(leaves.values()))
    for name, a, b in zip(leaves, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["var4", "const"])
def test_strong_decay_finite_and_exact(layout, scan_path):
    inputs = make_inputs(2, 8, 300, 16, 4 if layout == "var4" else 1, layout, init="strong")
    step = torch.nn.functional.softplus(inputs["delta"]) * inputs["A"][:, -1][None, :, None]
    assert step.min() < -20, "the case must reach delta*A < -20 per step"
    out_r, last_r, g_r = run(inputs, "ref")
    out_t, last_t, g_t = run(inputs, "torch")
    for t in [out_t, last_t, *g_t.values()]:
        assert torch.isfinite(t).all()
    assert_same(out_t, out_r, "out")
    for name in inputs:
        assert_same(g_t[name], g_r[name], f"grad {name}")


def test_extreme_decay_stays_finite(scan_path):
    # delta*A of -1000 per step: any scheme that divides by a cumulative decay overflows here.
    inputs = make_inputs(1, 4, 64, 4, 1, "var4", init="strong")
    inputs["delta"] = torch.full_like(inputs["delta"], 300.0)
    out, last, grads = run(inputs, "torch")
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    out_r, _, _ = run(inputs, "ref", with_grad=False)
    assert_same(out, out_r, "out")


def test_optional_arguments_and_plain_output():
    inputs = make_inputs(2, 8, 33, 4, 2, "var4")
    # Without softplus the caller must pass a positive step.
    inputs["delta"] = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    inputs["delta_bias"] = 0.01 * torch.rand(8)
    for drop in ("D", "z", "delta_bias"):
        kw = {k: v for k, v in inputs.items() if k != drop}
        a = selective_scan_fn(**kw, delta_softplus=False, backend="torch")
        b = selective_scan_ref(**kw, delta_softplus=False)
        assert a.shape == (2, 8, 33)
        assert_same(a, b, f"without {drop}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_return_input_dtype(dtype):
    inputs = make_inputs(2, 8, 40, 4, 2, "var4")
    low = {k: v.to(dtype) for k, v in inputs.items()}
    out = selective_scan_fn(**low, delta_softplus=True, backend="torch")
    assert out.dtype == dtype
    ref = selective_scan_ref(**{k: v.float() for k, v in low.items()}, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_backend_selection_and_errors():
    assert selective_scan.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert selective_scan.resolve_backend("ref", torch.device("cpu")) == "ref"
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan.resolve_backend("fast", torch.device("cpu"))
    if not selective_scan.cuda_backend_available():
        with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
            selective_scan.resolve_backend("cuda", torch.device("cpu"))


def test_shape_errors_name_the_argument():
    inputs = make_inputs(2, 8, 10, 4, 2, "var4")
    bad = dict(inputs, B=torch.randn(2, 3, 4, 10))
    with pytest.raises(ValueError, match="divisible"):
        selective_scan_fn(**bad)
    bad = dict(inputs, A=torch.randn(7, 4))
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_fn(**bad)
    bad = dict(inputs, C=torch.randn(2, 2, 4, 9))
    with pytest.raises(ValueError, match="variable C"):
        selective_scan_fn(**bad)


def test_step_scan_only_where_its_states_fit(monkeypatch):
    """_StepScan holds every state: a scan whose states exceed STEP_SCAN_MAX_BYTES runs in chunks, and a long scan
    with torch.compile on keeps the compiled chunks."""
    monkeypatch.setenv(selective_scan.COMPILE_ENV, "0")
    n = selective_scan.STEP_SCAN_MAX_BYTES // 4
    assert selective_scan._step_path(1, 1, n, 1) and not selective_scan._step_path(1, 1, n + 1, 1)
    monkeypatch.setenv(selective_scan.COMPILE_ENV, "1")
    long_scan = selective_scan.CHUNK * selective_scan.COMPILE_MIN_CHUNKS
    assert selective_scan._step_path(1, 1, long_scan - selective_scan.CHUNK, 1)
    assert not selective_scan._step_path(1, 1, long_scan - selective_scan.CHUNK + 1, 1)


def test_ref_backward_is_linear_in_length():
    # The oracle itself must be usable at realistic lengths (its backward walks unbind lists).
    inputs = make_inputs(1, 4, 2048, 4, 1, "var4")
    out, last, grads = run(inputs, "ref")
    assert torch.isfinite(grads["u"]).all()


@pytest.mark.slow
def test_compiled_matches_ref(monkeypatch):
    """The torch.compile'd chunk kernels (the default outside tests) agree with the oracle."""
    monkeypatch.setenv(selective_scan.COMPILE_ENV, "1")
    monkeypatch.setattr(selective_scan, "COMPILE_MIN_CHUNKS", 1)     # this short scan too
    inputs = make_inputs(2, 16, 70, 16, 4, "var4")
    out_r, last_r, g_r = run(inputs, "ref")
    out_t, last_t, g_t = run(inputs, "torch")
    assert selective_scan._compile_failed is None, f"compile failed: {selective_scan._compile_failed!r}"
    assert "fwd" in selective_scan._compiled and "bwd" in selective_scan._compiled
    assert_same(out_t, out_r, "out")
    assert_same(last_t, last_r, "last_state")
    for name in inputs:
        assert_same(g_t[name], g_r[name], f"grad {name}")


def test_short_scans_run_eagerly_where_compiling_is_on(monkeypatch):
    """A scan shorter than COMPILE_MIN_CHUNKS chunks never pays for torch.compile (it costs more than it saves)."""
    monkeypatch.setenv(selective_scan.COMPILE_ENV, "1")
    monkeypatch.setattr(selective_scan, "_compiled", {})
    calls = []
    monkeypatch.setattr(torch, "compile", lambda *a, **k: calls.append(a) or a[0])
    L = selective_scan.CHUNK * (selective_scan.COMPILE_MIN_CHUNKS - 1)
    run(make_inputs(1, 8, L, 4, 1, "var4"), "torch")
    assert calls == [] and selective_scan._compiled == {}
    run(make_inputs(1, 8, L + selective_scan.CHUNK, 4, 1, "var4"), "torch")
    assert len(calls) == 2       # the forward and backward chunk functions, for the long scan


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _check_against_ref_on_cuda(backend):
    inputs = {k: v.cuda() for k, v in make_inputs(2, 16, 300, 16, 4, "var4").items()}
    out_r, last_r, g_r = run(inputs, "ref")
    out_b, last_b, g_b = run(inputs, backend)
    assert out_b.is_cuda and out_b.dtype == torch.float32
    assert_same(out_b, out_r, "out")
    assert_same(last_b, last_r, "last_state")
    for name in inputs:
        assert_same(g_b[name], g_r[name], f"grad {name}")


@needs_cuda
def test_torch_backend_on_cuda_matches_ref():
    _check_against_ref_on_cuda("torch")


@needs_cuda
@pytest.mark.slow
def test_compiled_torch_backend_on_cuda_matches_ref(monkeypatch):
    """The Triton kernels torch.compile makes for the chunk loop on CUDA agree with the oracle."""
    monkeypatch.setenv(selective_scan.COMPILE_ENV, "1")
    _check_against_ref_on_cuda("torch")
    assert selective_scan._compile_failed is None, f"compile failed: {selective_scan._compile_failed!r}"


def test_auto_avoids_the_fused_kernel_when_last_state_needs_grad(monkeypatch):
    """mamba-ssm's kernel drops the last state's gradient: auto must not pick it for such calls."""
    monkeypatch.setattr(selective_scan, "_cuda_import_tried", True)
    monkeypatch.setattr(selective_scan, "_cuda_fn", lambda *a: None)
    monkeypatch.setattr(selective_scan, "_warned_last_state", False)
    cuda = torch.device("cuda")
    assert selective_scan.resolve_backend("auto", cuda) == "cuda"
    # where our Triton kernels can run they take such calls (they compute the last state's gradient), else torch
    expected = "triton" if selective_scan._triton_module().available(cuda) else "torch"
    with pytest.warns(UserWarning, match="drops the last state's gradient"):
        assert selective_scan.resolve_backend("auto", cuda, last_state_grad=True) == expected
    assert selective_scan.resolve_backend("cuda", cuda, last_state_grad=True) == "cuda"


@pytest.mark.skipif(not selective_scan.cuda_backend_available(),
                    reason="needs a CUDA device and mamba-ssm's selective_scan_cuda extension")
def test_mamba_ssm_kernel_matches_ref():
    """Outputs, last state and every input gradient of an output loss match the oracle; the kernel's last state
    comes back detached (mamba-ssm has no gradient for it) and auto routes last-state gradients to torch."""
    inputs = {k: v.cuda() for k, v in make_inputs(2, 16, 300, 16, 4, "var4").items()}
    w = torch.randn(2, 16, 300, generator=torch.Generator().manual_seed(3)).cuda()
    res = {}
    for backend in ("ref", "cuda"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
        (out * w).sum().backward()
        res[backend] = (out.detach(), last, {k: v.grad for k, v in leaves.items()})
    (out_r, last_r, g_r), (out_c, last_c, g_c) = res["ref"], res["cuda"]
    assert_same(out_c, out_r, "out")
    assert_same(last_c, last_r.detach(), "last_state")
    assert not last_c.requires_grad
    for name in inputs:
        assert_same(g_c[name], g_r[name], f"grad {name}")
    assert selective_scan.resolve_backend("auto", torch.device("cuda")) == "cuda"
    assert selective_scan.resolve_backend("auto", torch.device("cuda"), last_state_grad=True) in ("triton", "torch")
