"""hpclm.ops.fused_softmax against a float64 torch reference: every compiled CPU path, every dtype,
every mask form, forward and backward, plus the gate, the fallback, torch.compile and bad input."""
from __future__ import annotations

import logging

import pytest
import torch

from hpclm import native, ops
from hpclm.nn import FusedScaleMaskSoftmax
from hpclm.ops import fused_softmax, fused_softmax_available

_C = native.require()
BUILD = _C.build_info()

SKS = (1, 3, 17, 64, 100, 1000, 4097)
# (rtol, atol) against the float64 reference; fp32 ~ what torch.softmax itself reaches in float32
FORWARD_TOL = {torch.float32: (2e-6, 1e-8), torch.float64: (1e-12, 1e-15)}
BACKWARD_TOL = {torch.float32: (1e-5, 1e-7), torch.float64: (1e-10, 1e-13)}
# Half types: computed in float32 and rounded once, so the error is relative to each value. Unit roundoff
# (half an ulp of 1), and the absolute error of values too small for a normal number (float16's
# subnormal spacing; for bfloat16, float32's smallest normal number, below which exp may give 0).
HALF_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF_TINY = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-126}


def reference(x, scale=1.0, mask=None, causal=False):
    """Float64 softmax(scale * x) with masked keys excluded; all-masked rows are zeros (differentiable)."""
    s = x.double() * scale
    sq, sk = s.shape[-2], s.shape[-1]
    masked = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if causal:
        i = torch.arange(sq, device=s.device)[:, None]
        j = torch.arange(sk, device=s.device)[None, :]
        masked = masked | (j > i + (sk - sq))
    if mask is not None:
        masked = masked | mask
    all_masked = masked.all(-1, keepdim=True)
    s = s.masked_fill(masked & ~all_masked, float("-inf")).masked_fill(all_masked, 0.0)
    return torch.softmax(s, -1) * ~masked


def assert_close(got, want, tol, what=""):
    rtol, atol = tol
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_softmax_close(y, want, dtype, what=""):
    """Forward: float types to FORWARD_TOL; half types element by element within 2 units of roundoff of
    each probability (so small probabilities are checked as closely as large ones), and every row sums to
    what the reference's does (1, or 0 for a row with every key masked)."""
    if dtype not in HALF_EPS:
        return assert_close(y, want, FORWARD_TOL[dtype], what)
    eps, tiny = HALF_EPS[dtype], HALF_TINY[dtype]
    err = (y.double() - want).abs()
    bound = 2 * eps * want.abs() + tiny
    assert (err <= bound).all(), f"{what}: worst error {float((err / bound).max()):.2f}x the bound"
    visible = (want > 0).sum(-1)
    row_err = (y.double().sum(-1) - want.sum(-1)).abs()
    assert (row_err <= 2 * eps + visible * tiny).all(), f"{what}: a row sums to {float(y.double().sum(-1).min())}"


def assert_softmax_grad_close(dx, want_dx, y64, dy, scale, dtype, what=""):
    """Backward dx = scale * y * (dy - sum(dy * y)): half types within a few units of roundoff of the terms
    each element is made of (the difference may cancel, so the bound follows the terms, not dx)."""
    if dtype not in HALF_EPS:
        return assert_close(dx, want_dx, BACKWARD_TOL[dtype], what)
    eps, tiny = HALF_EPS[dtype], HALF_TINY[dtype]
    dy = dy.double()
    terms = scale * y64.abs() * (dy.abs() + (dy * y64).abs().sum(-1, keepdim=True))
    # float16's subnormal y (below 2^-14) carry an absolute error of up to `tiny` each, into y_i and into the sum
    subnormal = scale * (dy.abs() + y64.abs() * dy.abs().sum(-1, keepdim=True)) * tiny
    err = (dx.double() - want_dx).abs()
    bound = 4 * eps * terms + 2 * subnormal + tiny
    assert (err <= bound).all(), f"{what}: worst error {float((err / bound).max()):.2f}x the bound"


def mask_forms(b, h, sq, sk, gen):
    """Every supported mask form, each with at least one fully masked row where the shape allows."""
    pad = torch.rand(b, 1, 1, sk, generator=gen) < 0.3
    pad[0, 0, 0, :] = True                       # batch 0: every key masked
    per_query = torch.rand(b, 1, sq, sk, generator=gen) < 0.3
    per_query[-1, 0, -1, :] = True
    shared = torch.rand(1, 1, sq, sk, generator=gen) < 0.3
    full = torch.rand(b, h, sq, sk, generator=gen) < 0.5
    return {"none": None, "[b,1,1,sk]": pad, "[b,1,sq,sk]": per_query, "[1,1,sq,sk]": shared,
            "[b,h,sq,sk]": full, "[sk]": torch.rand(sk, generator=gen) < 0.2}


def _paths():
    return BUILD["cpu_paths_compiled"]


@pytest.fixture(params=_paths())
def cpu_path(request):
    if request.param not in BUILD["cpu_paths_supported"]:
        pytest.skip(f"this CPU does not run the {request.param} path")
    _C.set_cpu_path(request.param)
    yield request.param
    _C.set_cpu_path("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_forward_and_backward_match_float64_reference(cpu_path, dtype):
    gen = torch.Generator().manual_seed(1)
    turn = 0  # rotates through the mask forms so every form meets several lengths, causal and not
    for sk in SKS:
        b, h = 2, 2
        for sq in (1, sk + 2) if sk <= 17 else (3,):
            x = (torch.randn(b, h, sq, sk, generator=gen) * 3).to(dtype)
            dy = torch.randn(b, h, sq, sk, generator=gen).to(dtype)
            forms = list(mask_forms(b, h, sq, sk, gen).items())
            cases = [(forms[0], False), (forms[0], True)]
            for _ in range(2):
                turn += 1
                cases.append((forms[1 + turn % (len(forms) - 1)], turn % 2 == 0))
            for (name, mask), causal in cases:
                what = f"{cpu_path} {dtype} sq={sq} sk={sk} mask={name} causal={causal}"
                xg = x.clone().requires_grad_(True)
                y = fused_softmax(xg, 0.7, mask, causal)
                assert y.dtype == dtype and y.shape == x.shape
                (dx,) = torch.autograd.grad(y, xg, dy)
                x64 = x.double().requires_grad_(True)
                want = reference(x64, 0.7, mask, causal)
                (want_dx,) = torch.autograd.grad(want, x64, dy.double())
                assert_softmax_close(y, want, dtype, what + " forward")
                assert_softmax_grad_close(dx, want_dx, want, dy, 0.7, dtype, what + " backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_large_outputs_take_the_streaming_store_path(dtype):
    # > 16 MiB of output with 64-byte aligned rows: the kernels write with non-temporal stores
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 4 if dtype == torch.bfloat16 else 2, 1100, 1024, generator=gen).to(dtype)
    assert x.numel() * x.element_size() > 16 << 20
    mask = torch.rand(2, 1, 1, 1024, generator=gen) < 0.2
    xg = x.clone().requires_grad_(True)
    y = fused_softmax(xg, 0.3, mask, causal=True)  # sq > sk: the first 76 rows see no key
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    (dx,) = torch.autograd.grad(y, xg, dy)
    want = reference(x, 0.3, mask, causal=True)
    assert_softmax_close(y, want, dtype, "forward")
    y64 = want
    want_dx = 0.3 * y64 * (dy.double() - (dy.double() * y64).sum(-1, keepdim=True))
    assert_softmax_grad_close(dx, want_dx, y64, dy, 0.3, dtype, "backward")


def test_fully_masked_rows_give_zeros_and_zero_grad(cpu_path):
    x = torch.randn(2, 3, 6, 4, requires_grad=True)  # sq > sk causal: the first 2 queries see no key
    mask = torch.zeros(2, 1, 6, 4, dtype=torch.bool)
    mask[1, 0, 4, :] = True
    y = fused_softmax(x, 1.0, mask, causal=True)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert (y[:, :, :2] == 0).all() and (x.grad[:, :, :2] == 0).all()
    assert (y[1, :, 4] == 0).all() and (x.grad[1, :, 4] == 0).all()
    rows = y.sum(-1)
    assert torch.allclose(rows[0, :, 2:], torch.ones(3, 4))  # the other rows still sum to 1


def test_extreme_logits_and_large_scale(cpu_path):
    # power-of-two scales keep scale * x exact in float32, so only the softmax itself is compared
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 8, 257, generator=gen) * 50
        x[0, :, ::7] = 1e4
        x[1, :, ::5] = -1e4
        x[2, :, 3] = 3e4
        x = x.to(dtype)
        for scale in (1.0, 1024.0):
            for causal in (False, True):
                y = fused_softmax(x, scale, None, causal)
                assert torch.isfinite(y).all()
                assert_softmax_close(y, reference(x, scale, None, causal), dtype, f"{dtype} scale={scale}")


def test_nan_in_visible_keys_is_not_hidden(cpu_path):
    x = torch.randn(2, 3, 40)
    x[0, 1, 2] = float("nan")  # query 1 sees keys 0..38 (causal, sk - sq = 37)
    y = fused_softmax(x, 1.0, None, causal=True)
    assert y[0, 1, :39].isnan().all() and (y[0, 1, 39:] == 0).all()
    assert not y[0, 0].isnan().any() and not y[1].isnan().any()
    y = fused_softmax(x, 1.0)
    assert y[0, 1].isnan().all() and not y[0, 0].isnan().any()


def test_non_contiguous_input_and_mask(cpu_path):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 37, 4, 33, generator=gen)
    x = base.transpose(1, 2)                   # [2, 4, 37, 33], non-contiguous
    mask = (torch.rand(2, 1, 33, 37, generator=gen) < 0.3).transpose(-1, -2)  # [2, 1, 37, 33], key stride 37
    assert not x.is_contiguous() and mask.stride(-1) != 1
    xg = x.clone().requires_grad_(True)
    y = fused_softmax(xg, 0.3, mask, causal=True)
    x64 = x.double().requires_grad_(True)
    want = reference(x64, 0.3, mask, causal=True)
    dy = torch.randn(y.shape, generator=gen).transpose(0, 1).contiguous().transpose(0, 1)  # strided grad
    (dx,) = torch.autograd.grad(y, xg, dy)
    (want_dx,) = torch.autograd.grad(want, x64, dy.double())
    assert_close(y, want, FORWARD_TOL[torch.float32], "forward")
    assert_close(dx, want_dx, BACKWARD_TOL[torch.float32], "backward")


def test_leading_dims_and_mask_layouts_are_read_in_place():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 5, 9, generator=gen)  # [a, b, h, sq, sk]
    forms = {
        "[a,1,1,sq,sk]": (torch.rand(2, 1, 1, 5, 9, generator=gen) < 0.3, True),
        "[a,b,1,1,sk]": (torch.rand(2, 3, 1, 1, 9, generator=gen) < 0.3, True),
        "[1,1,1,sq,sk]": (torch.rand(1, 1, 1, 5, 9, generator=gen) < 0.3, True),
        "[a,1,h,sq,sk]": (torch.rand(2, 1, 4, 5, 9, generator=gen) < 0.3, False),  # needs one dense copy
    }
    for name, (mask, in_place) in forms.items():
        y = fused_softmax(x, 1.0, mask)
        assert_close(y, reference(x, 1.0, mask), FORWARD_TOL[torch.float32], name)
        _, view, _ = ops._kernel_layout(x.shape, mask)
        assert (view.data_ptr() == mask.data_ptr()) == in_place, name
    for x_shape, mask_shape in (((9,), (9,)), ((5, 9), (9,)), ((3, 5, 9), (3, 1, 9)), ((3, 5, 9), ())):
        x = torch.randn(x_shape, generator=gen)
        mask = torch.rand(mask_shape, generator=gen) < 0.3
        want = reference(x.reshape(-1, x_shape[-1]), 0.5, mask).reshape(x_shape) if x.dim() == 1 else \
            reference(x, 0.5, mask)
        assert_close(fused_softmax(x, 0.5, mask), want, FORWARD_TOL[torch.float32], f"x {x_shape} mask {mask_shape}")


def test_gradcheck_float64(cpu_path):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(2, 1, 1, 7, generator=gen) < 0.3
    for m, causal in ((None, False), (mask, True)):
        assert torch.autograd.gradcheck(lambda t: fused_softmax(t, 0.8, m, causal), (x,))


def test_one_and_two_threads_give_identical_results():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 2, 64, 300, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    mask = torch.rand(4, 1, 1, 300, generator=gen) < 0.2
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xg = x.clone().requires_grad_(True)
            y = fused_softmax(xg, 0.5, mask, causal=True)
            results.append((y, torch.autograd.grad(y, xg, dy)[0]))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_torch_compile_fullgraph_traces_the_op():
    def attention_probs(scores, mask):
        return fused_softmax(scores * 2.0, 0.25, mask, causal=True)

    compiled = torch.compile(attention_probs, fullgraph=True)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 8, 8, generator=gen)
    mask = torch.rand(2, 1, 1, 8, generator=gen) < 0.2
    dy = torch.randn(x.shape, generator=gen)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yc = attention_probs(xe, mask), compiled(xc, mask)
    ye.backward(dy)
    yc.backward(dy)
    assert torch.allclose(yc, ye, rtol=1e-6, atol=1e-7)
    assert torch.allclose(xc.grad, xe.grad, rtol=1e-6, atol=1e-7)


def test_opcheck_schema_fake_and_autograd_registration():
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    mask = torch.rand(2, 1, 1, 6) < 0.3
    torch.library.opcheck(torch.ops.hpclm.fused_softmax.default, (x, 0.5, mask, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    y = torch.rand(2, 3, 5, 6)
    torch.library.opcheck(torch.ops.hpclm.fused_softmax_backward.default, (y, torch.randn_like(y), 0.5, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_gate_and_fallback_compute_the_same_and_log_once(monkeypatch, caplog):
    assert fused_softmax_available(torch.zeros(2, 3))
    assert not fused_softmax_available(torch.zeros(2, 3, device="meta"))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 6, 5, generator=gen)
    mask = torch.rand(2, 1, 6, 5, generator=gen) < 0.4
    mask[0, 0, 2, :] = True
    dy = torch.randn(x.shape, generator=gen)

    def run():
        xg = x.clone().requires_grad_(True)
        y = fused_softmax(xg, 0.9, mask, causal=True)
        return y, torch.autograd.grad(y, xg, dy)[0]

    fused_y, fused_dx = run()
    vector = torch.randn(7, generator=gen)
    fused_vector = fused_softmax(vector, 0.5, vector > 1.0, causal=True)  # 1-D: one query
    monkeypatch.setattr(ops.native, "extension", lambda: None)
    monkeypatch.setattr(ops.native, "load_error", lambda: "simulated: hpclm._C not built")
    monkeypatch.setattr(ops, "_logged_fallbacks", set())
    assert not fused_softmax_available(x)
    with caplog.at_level(logging.WARNING, logger="hpclm.ops"):
        torch_y, torch_dx = run()
        run()
    messages = [r.getMessage() for r in caplog.records if "simulated" in r.getMessage()]
    assert len(messages) == 1 and "torch ops" in messages[0]
    assert_close(torch_y, fused_y, FORWARD_TOL[torch.float32], "fallback forward")
    assert_close(torch_dx, fused_dx, BACKWARD_TOL[torch.float32], "fallback backward")
    assert (torch_y[0, :, 2] == 0).all() and (torch_dx[0, :, 2] == 0).all()
    assert_close(fused_softmax(vector, 0.5, vector > 1.0, causal=True), fused_vector, FORWARD_TOL[torch.float32], "1-D")
    meta = fused_softmax(torch.zeros(2, 4, 4, device="meta"), 1.0, None, True)
    assert meta.shape == (2, 4, 4) and meta.device.type == "meta"


def test_module_matches_op():
    x = torch.randn(2, 2, 4, 6)
    mask = torch.rand(2, 1, 1, 6) < 0.3
    module = FusedScaleMaskSoftmax(scale=0.5, causal=True)
    assert torch.equal(module(x, mask), fused_softmax(x, 0.5, mask, causal=True))
    assert "scale=0.5, causal=True" in repr(module)


@pytest.mark.parametrize("args, words", [
    ((torch.randn(2, 3, 4), 1.0, torch.ones(2, 3, dtype=torch.bool)), ["[2, 3]", "[2, 3, 4]", "broadcast"]),
    ((torch.ones(2, 3, 4, dtype=torch.int64),), ["int64", "[2, 3, 4]"]),
    ((torch.randn(2, 3, 0),), ["[2, 3, 0]", "non-empty last dimension"]),
    ((torch.randn(2, 3), 1.0, torch.ones(2, 3, dtype=torch.bool, device="meta")), ["meta", "cpu", "[2, 3]"]),
    ((torch.randn(2, 3), 1.0, torch.ones(2, 3)), ["float32", "[2, 3]", "True = masked", "pass `mask == 0`"]),
    ((torch.randn(2, 3), float("nan")), ["finite"]),
    ((torch.randn(2, 3), 1.0, None, 1), ["causal"]),
], ids=["mask-not-broadcastable", "integer-dtype", "empty-last-dim", "mismatched-devices", "non-bool-mask",
        "nan-scale", "causal-not-bool"])
def test_bad_input_raises_value_error_naming_the_problem(args, words):
    with pytest.raises(ValueError) as err:
        fused_softmax(*args)
    for word in words:
        assert word in str(err.value)


def test_the_advice_for_a_keep_mask_gives_the_causal_softmax():
    """nanoGPT keeps a float tril buffer (1 = attend); what the error message says to pass is right."""
    x = torch.randn(2, 3, 6, 6)
    keep = torch.tril(torch.ones(6, 6)).view(1, 1, 6, 6)
    with pytest.raises(ValueError, match="pass `mask == 0`"):
        fused_softmax(x, 0.5, keep)
    assert torch.equal(fused_softmax(x, 0.5, keep == 0), fused_softmax(x, 0.5, causal=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_float32_scores_give_the_autocast_dtype(dtype):
    """As apex's and Megatron-LM's fused softmax: inside torch.autocast the op runs in, and returns, the
    autocast dtype; its gradient reaches the float32 scores as float32; float64 is left alone."""
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    dy = torch.randn(2, 3, 7, 9)
    with torch.autocast("cpu", dtype=dtype):
        y = fused_softmax(x, 0.5, causal=True)
        compiled = torch.compile(lambda t: fused_softmax(t, 0.5, causal=True), fullgraph=True)(x.detach())
        double = fused_softmax(x.detach().double(), 0.5)
    assert y.dtype == dtype and compiled.dtype == dtype and double.dtype == torch.float64
    assert torch.equal(y, fused_softmax(x.detach().to(dtype), 0.5, causal=True))
    assert torch.equal(compiled, y.detach())
    y.backward(dy.to(dtype))
    assert x.grad.dtype == torch.float32
    outside = fused_softmax(x.detach(), 0.5, causal=True)
    assert outside.dtype == torch.float32  # autocast off: the dtype given


def test_kernel_rejects_bad_shapes_without_crashing():
    with pytest.raises(ValueError, match="last dimension has size 0"):
        _C.softmax_forward(0, 0, "float32", [1, 1, 1, 0], 1.0)
    with pytest.raises(ValueError, match="unsupported dtype"):
        _C.softmax_forward(0, 0, "int8", [1, 1, 1, 4], 1.0)


def test_empty_batch_gives_empty_output():
    x = torch.randn(0, 3, 5, requires_grad=True)
    y = fused_softmax(x, causal=True)
    y.sum().backward()
    assert y.shape == (0, 3, 5) and x.grad.shape == (0, 3, 5)


# ---- CUDA: run where a GPU exists -------------------------------------------------------------

def _cuda_skip_reason():
    if not BUILD["with_cuda"]:
        return "hpclm._C was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


requires_cuda = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=_cuda_skip_reason() or "")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_matches_float64_reference(dtype):
    gen = torch.Generator().manual_seed(9)
    # warp-per-row up to sk = 1024, block-per-row beyond (up to 65,536 and past it)
    for sk, sq in ((1, 1), (3, 5), (17, 4), (100, 7), (1000, 3), (1025, 2), (4097, 2), (65536, 2), (70001, 1)):
        b, h = 2, 2
        x = (torch.randn(b, h, sq, sk, generator=gen) * 3).to(dtype)
        dy = torch.randn(b, h, sq, sk, generator=gen).to(dtype)
        for name, mask in mask_forms(b, h, sq, sk, gen).items():
            for causal in (False, True):
                what = f"cuda {dtype} sq={sq} sk={sk} mask={name} causal={causal}"
                xg = x.cuda().requires_grad_(True)
                y = fused_softmax(xg, 0.7, None if mask is None else mask.cuda(), causal)
                (dx,) = torch.autograd.grad(y, xg, dy.cuda())
                x64 = x.double().requires_grad_(True)
                want = reference(x64, 0.7, mask, causal)
                (want_dx,) = torch.autograd.grad(want, x64, dy.double())
                assert_softmax_close(y.cpu(), want, dtype, what + " forward")
                assert_softmax_grad_close(dx.cpu(), want_dx, want, dy, 0.7, dtype, what + " backward")


@requires_cuda
def test_cuda_fully_masked_rows_and_side_stream():
    x = torch.randn(2, 3, 6, 4, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = fused_softmax(x, 1.0, None, causal=True)
    stream.synchronize()
    assert torch.isfinite(y).all() and (y[:, :, :2] == 0).all()
    assert torch.allclose(y.cpu(), reference(x.cpu(), 1.0, None, True).float(), atol=1e-6)


@requires_cuda
def test_cuda_autocast_gives_the_autocast_dtype():
    x = torch.randn(2, 3, 7, 9, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        y = fused_softmax(x, 0.5, causal=True)
    assert y.dtype == torch.float16 and torch.equal(y, fused_softmax(x.half(), 0.5, causal=True))
