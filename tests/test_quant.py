"""Weight quantization: hpclm._C.quant_matmul on every CPU path against a float64 reference of
dequantize-then-matmul (of the weights and of the activations' int8 form: per block of 32, or per row for
int8-channel), the quantizers' rounding, and `hpclm quantize` -> eval / generate / serve on Tiny Shakespeare (val loss against the float checkpoint's, file size, one-line errors)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import run_python
from helpers.lm_fixtures import shakespeare_dir, tiny_config  # noqa: F401

pytest.importorskip("hpclm._C", reason="hpclm._C is not built (pip install -e .)")
from hpclm import native  # noqa: E402
from hpclm.kernels import quant  # noqa: E402
from hpclm.kernels.quant import (SCHEMES, QuantLinear, dequantize_activations, dequantize_weight,  # noqa: E402
                                 quantize_activations, quantize_weight)

def force_torch_path(m):
    """QuantLinear computes through its torch path (dequantize, F.linear), as where no kernel serves."""
    m.setattr(quant, "_unavailable_reason", lambda x: "forced by the test")


# ---- the kernel -------------------------------------------------------------------------------------

# M = 1 .. past a row tile (and, from 64 rows, the VNNI path's converted panels); N = 1, a panel's width +- 1, an
# odd number of panels; K odd, not a multiple of the block or a vector
SHAPES = [(1, 1, 1), (1, 17, 33), (2, 16, 31), (3, 40, 70), (7, 100, 64), (12, 33, 95), (13, 50, 100), (64, 48, 96),
          (5, 130, 300), (20, 33, 70)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_path_matches_float64_dequantize_then_matmul(cpu_path, scheme, dtype):
    for M, N, K in SHAPES:
        torch.manual_seed(M * 1000 + N + K)
        lin = torch.nn.Linear(K, N)
        q = QuantLinear.from_linear(lin, scheme)
        wide = torch.randn(M, K + 3).to(dtype)  # rows with a stride longer than K
        x = wide[:, 1:K + 1]
        ref = dequantize_activations(x, scheme).double() @ q.dequantized_weight().double().t() + lin.bias.double()
        got = q(x)
        assert got.shape == (M, N) and got.dtype == dtype
        # fp32: float32 summation over K; bf16: the result is rounded to bfloat16 (8 bits)
        tol = (1e-6 * K ** 0.5 if dtype == torch.float32 else 2 ** -8) * ref.abs().max().item() + 1e-6
        assert (got.double() - ref).abs().max().item() <= tol, (cpu_path, scheme, M, N, K)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_without_bias_and_empty_inputs(cpu_path, scheme):
    torch.manual_seed(1)
    lin = torch.nn.Linear(45, 20, bias=False)
    q, x = QuantLinear.from_linear(lin, scheme), torch.randn(3, 45)
    ref = dequantize_activations(x, scheme).double() @ q.dequantized_weight().double().t()
    assert torch.allclose(q(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert q(torch.randn(0, 45)).shape == (0, 20)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_row_is_the_same_alone_and_in_any_batch(cpu_path, scheme):
    torch.manual_seed(0)
    q, x = QuantLinear.from_linear(torch.nn.Linear(200, 72), scheme), torch.randn(70, 200)
    batched = q(x)  # (the VNNI path's tiles: up to 8 rows of one panel, and from 64 rows 6 rows x 2 panels)
    for rows in ([0], [5], [0, 1], [3, 4, 5], list(range(8)), list(range(11)), list(range(13)), list(range(40)),
                 list(range(70))):
        assert torch.equal(q(x[rows]), batched[rows]), (cpu_path, scheme, rows)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_inputs_of_any_rank_and_layout_give_the_rows_results(scheme):
    torch.manual_seed(9)
    q, x = QuantLinear.from_linear(torch.nn.Linear(40, 24), scheme), torch.randn(6, 40)
    flat = q(x)
    assert torch.equal(q(x.view(2, 3, 40)), flat.view(2, 3, 24))                       # contiguous, 3-D
    assert torch.equal(q(x.view(3, 2, 40).transpose(0, 1)), flat.view(3, 2, 24).transpose(0, 1))  # strided, 3-D
    assert torch.equal(q(x[4]), flat[4]) and q(x[4]).shape == (24,)                     # one row, 1-D
    assert torch.equal(q(x.view(1, 6, 1, 40)), flat.view(1, 6, 1, 24))


def test_a_changed_or_replaced_bias_is_used():
    torch.manual_seed(7)
    q, x = QuantLinear.from_linear(torch.nn.Linear(40, 20), "int8-channel"), torch.randn(3, 40)
    without = q(x) - q.bias
    q.bias.data.add_(1.0)                      # in place
    assert torch.allclose(q(x), without + q.bias, atol=1e-5)
    q.bias.data = torch.full((20,), -2.0)      # new memory (as .to() gives)
    assert torch.allclose(q(x), without - 2.0, atol=1e-5)
    q.bias.data = torch.full((20,), 3.0, dtype=torch.float64)
    assert torch.allclose(q(x), without + 3.0, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_torch_fallback_computes_the_same(scheme, monkeypatch):
    torch.manual_seed(2)
    q, x = QuantLinear.from_linear(torch.nn.Linear(70, 33), scheme), torch.randn(5, 70)
    with monkeypatch.context() as m:
        force_torch_path(m)
        fallback = q(x)
    assert torch.allclose(q(x), fallback, rtol=1e-5, atol=1e-6)


def test_the_custom_op_passes_torch_opcheck():
    torch.manual_seed(3)
    for scheme in SCHEMES:
        q = QuantLinear.from_linear(torch.nn.Linear(40, 24), scheme)
        weights, scales = q.packed()
        torch.library.opcheck(torch.ops.hpclm.quant_linear.default,
                              (torch.randn(3, 40), q.qweight, q.scales, weights, scales, q.bias, scheme))


# ---- the quantizers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_weight_is_within_half_a_step_of_its_value(scheme):
    torch.manual_seed(4)
    w = torch.randn(37, 75) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different magnitudes
    q, scales = quantize_weight(w, scheme)
    deq = dequantize_weight(q, scales, scheme, 75)
    step = (scales.float()[:, None] if scheme == "int8-channel"
            else scales.float().repeat_interleave(32, dim=1)[:, :75]).abs()
    bound = step / 2
    if scheme == "int4-block32":  # each block's largest-magnitude weight maps to -8 exactly; 4 bits reach +7 only,
        values = quant._int4_values(q, 75)  # so weights of the other sign beyond 7.5 steps are clamped there
        assert values.max() <= 15 and (values.view(37, -1)[:, :64].view(37, 2, 32) == 0).any(dim=2).all()
        bound = torch.where(values == 15, step, bound)
        assert (bound == step).float().mean() < 0.05
    else:
        assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((deq - w).abs() <= bound * (1 + 1e-3) + 1e-12).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_activations_are_int8_per_block_of_32_or_per_row_within_half_a_step(scheme):
    torch.manual_seed(6)
    x = torch.randn(5, 70) * torch.logspace(-4, 2, 70)  # blocks of very different magnitudes
    q, scales = quantize_activations(x, scheme)
    per_row = scheme == "int8-channel"
    assert scales.shape == ((5, 1) if per_row else (5, 3)) and torch.equal(q, q.round())
    assert (q.abs().amax(dim=1) == 127).all() if per_row else (q[:, :64].view(5, 2, 32).abs().amax(dim=2) == 127).all()
    step = scales if per_row else scales.repeat_interleave(32, dim=1)[:, :70]
    assert ((dequantize_activations(x, scheme) - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(dequantize_activations(torch.zeros(2, 40), scheme), torch.zeros(2, 40))


def test_int8_channel_rows_longer_than_int32_sums_allow_take_the_torch_path(caplog):
    torch.manual_seed(8)
    k = quant.CHANNEL_MAX_K + 1
    q = QuantLinear.from_linear(torch.nn.Linear(k, 2), "int8-channel")
    x = torch.randn(1, k)
    ref = dequantize_activations(x, "int8-channel").double() @ q.dequantized_weight().double().t() + q.bias.double()
    with caplog.at_level("WARNING", logger="hpclm.ops"):
        got = torch.ops.hpclm.quant_linear(x, q.qweight, q.scales, *q.packed(), q.bias, "int8-channel")
    assert torch.allclose(q(x).double(), ref, rtol=1e-4, atol=1e-4) and torch.allclose(got, q(x))
    assert "int32" in caplog.text
    weights, scales = q.packed()
    with pytest.raises(ValueError, match="int8-channel"):
        native.extension().quant_matmul(x.data_ptr(), "float32", weights.data_ptr(), scales.data_ptr(), 0,
                                        torch.empty(1, 2).data_ptr(), 1, 2, k, k, 2, "int8-channel")


def test_int4_packs_two_weights_a_byte():
    q, scales = quantize_weight(torch.randn(3, 65), "int4-block32")
    assert q.shape == (3, 33) and q.dtype == torch.uint8 and scales.shape == (3, 3) and scales.dtype == torch.float16


# ---- hpclm quantize on trained models ------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_runs(shakespeare_dir, tmp_path_factory):  # noqa: F811
    """A tiny GPT and a tiny GRU trained on Tiny Shakespeare, long enough that their loss is far below uniform."""
    from hpclm.train import train
    root = tmp_path_factory.mktemp("quant")
    runs = {}
    for arch, sets in (("gpt", ["model.n_layer=2", "model.n_embd=64"]),
                       ("gru", ["model.arch=gru", "model.n_embd=32", "model.hidden_size=96"])):
        runs[arch] = root / arch
        train(tiny_config(shakespeare_dir, *sets, "train.max_iters=150", "train.eval_interval=0",
                          "train.log_interval=1000", "train.batch_size=8"), runs[arch], progress_bar=False)
    return runs


def _quantize(run, out, scheme, *extra):
    return run_python(["-m", "hpclm", "quantize", "--ckpt", str(run), "--out", str(out), "--scheme", scheme, *extra])


@pytest.fixture(scope="module")
def quantized_runs(trained_runs):
    out = {}
    for arch, run in trained_runs.items():
        for scheme in SCHEMES:
            out[arch, scheme] = run.parent / f"{arch}-{scheme}"
            proc = _quantize(run, out[arch, scheme], scheme)
            assert proc.returncode == 0, proc.stderr
            assert f"wrote {out[arch, scheme]}/checkpoints/iter_0000150 ({scheme}" in proc.stdout
    return out


@pytest.mark.parametrize("arch", ["gpt", "gru"])
def test_quantized_val_loss_is_within_0_01_nats_int8_and_0_05_int4(arch, trained_runs, quantized_runs, shakespeare_dir,
                                                                    capsys):
    from hpclm.data import load_dataset
    from hpclm.evaluate import split_loss
    from hpclm.generate import load_trained
    float_model = load_trained(trained_runs[arch])
    data = load_dataset(shakespeare_dir, float_model.cfg.data.block_size)
    ref, _ = split_loss(float_model.model, data.val, float_model.cfg.data.block_size)
    assert ref < 3.0  # trained: uniform over 65 characters is 4.17
    for scheme in SCHEMES:
        q = load_trained(quantized_runs[arch, scheme])
        assert q.quantization["scheme"] == scheme and q.quantization["source_step"] == 150
        loss, _ = split_loss(q.model, data.val, q.cfg.data.block_size)
        with capsys.disabled():
            print(f"\n{arch} val loss: float32 {ref:.4f}, {scheme} {loss:.4f} ({loss - ref:+.4f})", end="")
        assert abs(loss - ref) <= (0.05 if scheme == "int4-block32" else 0.01), (arch, scheme, ref, loss)


def test_quantized_checkpoints_are_at_most_0_3x_the_float_model(trained_runs, quantized_runs, shakespeare_dir,
                                                               tmp_path):
    from hpclm.quantize import weights_bytes
    from hpclm.train import checkpoint, train
    # a GPT whose weights are mostly matrices (the tiny ones' are not, their file's own overhead aside)
    run = tmp_path / "wide"
    train(tiny_config(shakespeare_dir, "model.n_layer=2", "model.n_embd=256", "train.max_iters=1",
                      "train.eval_interval=0"), run, progress_bar=False)
    full = weights_bytes(checkpoint.resolve(run))
    for scheme in SCHEMES:
        assert _quantize(run, tmp_path / scheme, scheme).returncode == 0
        size = weights_bytes(checkpoint.resolve(tmp_path / scheme))
        assert size <= (0.3 if scheme.startswith("int8") else 0.17) * full, (scheme, size, full)


@pytest.mark.parametrize("arch", ["gpt", "gru"])
def test_greedy_generation_is_deterministic_and_matches_the_torch_path(arch, quantized_runs, monkeypatch):
    from hpclm.generate import generate_text, load_trained
    for scheme in SCHEMES:
        q = load_trained(quantized_runs[arch, scheme])
        text = generate_text(q, "ROMEO:\n", 40, temperature=0.0)
        assert text == generate_text(q, "ROMEO:\n", 40, temperature=0.0)
        with monkeypatch.context() as m:
            force_torch_path(m)
            assert generate_text(load_trained(quantized_runs[arch, scheme]), "ROMEO:\n", 40, temperature=0.0) == text


def test_generate_eval_and_serve_load_a_quantized_checkpoint(quantized_runs):
    run = quantized_runs["gpt", "int4-block32"]
    gen = run_python(["-m", "hpclm", "generate", "--ckpt", str(run), "--prompt", "ROMEO:\n", "--max-new-tokens", "20",
                      "--temperature", "0"])
    assert gen.returncode == 0 and gen.stdout.startswith("ROMEO:\n") and len(gen.stdout) > 20, gen.stderr
    ev = run_python(["-m", "hpclm", "eval", "--ckpt", str(run)])
    assert ev.returncode == 0 and ev.stdout.startswith("val loss "), ev.stderr
    httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e .[dev])")
    pytest.importorskip("fastapi", reason="FastAPI is not installed (pip install -e .[serve])")
    from test_serve import Server
    server = Server(run)
    try:
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"prompt": "ROMEO:\n", "max_tokens": 20, "temperature": 0})
        assert r.status_code == 200, r.text
        assert "ROMEO:\n" + r.json()["choices"][0]["text"] == gen.stdout.rstrip("\n")
    finally:
        server.close()


def test_bad_requests_are_one_line_and_write_nothing(trained_runs, quantized_runs, shakespeare_dir, tmp_path):
    from hpclm.train import train
    quantized = quantized_runs["gpt", "int8-channel"]
    before = sorted(p.name for p in quantized.rglob("*"))

    def one_line(proc, *needles):
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        for needle in needles:
            assert needle in proc.stderr, proc.stderr

    one_line(_quantize(quantized, tmp_path / "again", "int8-block32"), "already quantized (int8-channel)",
             str(trained_runs["gpt"] / "checkpoints" / "iter_0000150"))
    one_line(_quantize(trained_runs["gpt"], quantized, "int4-block32"), "already exists", "--force")
    one_line(_quantize(trained_runs["gpt"], trained_runs["gpt"], "int8-channel", "--force"),
             "holds the checkpoint being quantized")
    export = run_python(["-m", "hpclm", "export", "--ckpt", str(quantized), "--out", str(tmp_path / "hf")])
    one_line(export, "is quantized (int8-channel)", "export the checkpoint it came from")
    ngram = tmp_path / "ngram"
    train(tiny_config(shakespeare_dir, "model.arch=ngram", "model.order=2"), ngram, progress_bar=False)
    one_line(_quantize(ngram, tmp_path / "q-ngram", "int8-channel"), "ngram model", "no matrices to quantize")
    assert not any((tmp_path / name).exists() for name in ("again", "q-ngram", "hf"))
    assert sorted(p.name for p in quantized.rglob("*")) == before
    # training does not resume from a quantized checkpoint
    cfg_path = tmp_path / "resume.toml"
    cfg_path.write_text(f'[data]\npath = {json.dumps(str(shakespeare_dir))}\nblock_size = 32\n'
                        '[model]\nn_layer = 2\nn_head = 2\nn_embd = 64\n[train]\nmax_iters = 200\nbatch_size = 8\n')
    resume = run_python(["-m", "hpclm", "train", "--config", str(cfg_path), "--out", str(quantized)])
    one_line(resume, "quantized checkpoint", "for inference only")
    assert sorted(p.name for p in quantized.rglob("*")) == before


def test_a_safetensors_run_quantizes_to_safetensors(shakespeare_dir, tmp_path):  # noqa: F811
    from hpclm.generate import generate_text, load_trained
    from hpclm.train import train
    run = tmp_path / "st"
    train(tiny_config(shakespeare_dir, "checkpoint.format=safetensors", "train.max_iters=2", "train.eval_interval=0"),
          run, progress_bar=False)
    proc = _quantize(run, tmp_path / "q", "int4-block32")
    assert proc.returncode == 0 and "model.safetensors" in proc.stdout, proc.stderr
    assert next((tmp_path / "q" / "checkpoints").glob("iter_*/model.safetensors"))
    q = load_trained(tmp_path / "q")
    assert q.quantization["scheme"] == "int4-block32" and len(generate_text(q, "a", 5, temperature=0.0)) == 6


def test_a_deep_copy_and_a_state_dict_round_trip_keep_the_results():
    torch.manual_seed(5)
    q = QuantLinear.from_linear(torch.nn.Linear(50, 30), "int4-block32")
    x = torch.randn(2, 50)
    other = QuantLinear(50, 30, "int4-block32")
    other.load_state_dict(copy.deepcopy(q.state_dict()))
    assert torch.equal(other(x), q(x)) and torch.equal(copy.deepcopy(q)(x), q(x))
