"""GPT and GRU models: gradients against an independent float64 reference, softmax paths, shapes."""
import math

import pytest
import torch

from hpclm import config
from hpclm.errors import HpclmError
from hpclm.models import GPT, GRULM, build_model, count_parameters
from hpclm.train.loop import lr_at, make_optimizer
from helpers.lm_fixtures import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-5) * w
    return y + b if b is not None else y


def reference_loss(p: dict, idx, targets, n_layer, n_head, bias):
    """GPT-2 forward written out from its definition, in float64 (no hpclm code)."""
    get = lambda name: p.get(name) if bias or not name.endswith(".bias") else None  # noqa: E731
    lin = lambda x, name: x @ p[name + ".weight"].T + (get(name + ".bias") if get(name + ".bias") is not None else 0)  # noqa: E731
    B, T = idx.shape
    x = p["transformer.wte.weight"][idx] + p["transformer.wpe.weight"][:T]
    C = x.shape[-1]
    hs = C // n_head
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer in range(n_layer):
        pre = f"transformer.h.{layer}."
        h = _layer_norm(x, p[pre + "ln_1.weight"], get(pre + "ln_1.bias"))
        q, k, v = lin(h, pre + "attn.c_attn").split(C, dim=-1)
        q, k, v = (t.reshape(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        s = torch.where(causal, s, torch.tensor(-math.inf, dtype=s.dtype))
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        y = (e / e.sum(-1, keepdim=True)) @ v
        x = x + lin(y.transpose(1, 2).reshape(B, T, C), pre + "attn.c_proj")
        h = _layer_norm(x, p[pre + "ln_2.weight"], get(pre + "ln_2.bias"))
        u = lin(h, pre + "mlp.c_fc")
        x = x + lin(0.5 * u * (1 + torch.erf(u / math.sqrt(2))), pre + "mlp.c_proj")
    x = _layer_norm(x, p["transformer.ln_f.weight"], get("transformer.ln_f.bias"))
    logits = x @ p["transformer.wte.weight"].T  # tied output embedding
    logz = torch.logsumexp(logits, -1)
    return (logz - logits.gather(-1, targets[..., None])[..., 0]).mean()


@pytest.mark.parametrize("softmax", ["torch", "sdpa", "auto"])
@pytest.mark.parametrize("bias", [True, False])
def test_gpt_one_step_gradient_matches_float64_reference(softmax, bias):
    torch.manual_seed(0)
    n_layer, n_head, vocab, T = 2, 4, 50, 16
    model = GPT(vocab, block_size=T, n_layer=n_layer, n_head=n_head, n_embd=32, bias=bias, softmax=softmax)
    with torch.no_grad():  # non-trivial biases and gains, so their gradients are tested too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, vocab, (3, T))
    targets = torch.randint(0, vocab, (3, T))
    _, loss = model(idx, targets)
    loss.backward()

    ref = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    ref_loss = reference_loss(ref, idx, targets, n_layer, n_head, bias)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert set(ref) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        want = ref[name].grad
        err = (p.grad.double() - want).norm() / want.norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_sdpa_under_cpu_bf16_autocast_runs_in_fp32(monkeypatch):
    """CPU autocast would run SDPA in bf16, whose CPU backward is several times slower: the model keeps it in fp32."""
    import hpclm.models.gpt as gpt
    seen = []
    real = gpt.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, **kw)
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = GPT(20, block_size=8, n_layer=1, n_head=2, n_embd=16, softmax="sdpa")
    idx = torch.randint(0, 20, (2, 8))
    _, want = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    assert seen == [(torch.float32, False), (torch.float32, False)]
    assert loss.item() == pytest.approx(want.item(), abs=0.05)  # still a bf16 model: close, not equal
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_auto_softmax_is_fused_under_cpu_autocast_and_sdpa_otherwise(monkeypatch):
    import hpclm.models.gpt as gpt
    calls = []
    real_sdpa = gpt.F.scaled_dot_product_attention
    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append("sdpa") or real_sdpa(*a, **kw))
    torch.manual_seed(0)
    model = GPT(20, block_size=8, n_layer=1, n_head=2, n_embd=16, softmax="auto")
    attn = model.transformer.h[0].attn
    if attn.fused_softmax is not None:
        real_fused = attn.fused_softmax
        attn.fused_softmax = lambda *a, **kw: calls.append("fused") or real_fused(*a, **kw)
    idx = torch.randint(0, 20, (2, 8))
    _, fp32 = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16 = model(idx, idx)
    assert calls == ["sdpa", "fused" if attn.fused_softmax is not None else "sdpa"]
    assert bf16.item() == pytest.approx(fp32.item(), abs=0.05)


def test_gpt_matches_nanogpt_parameter_layout_and_init():
    torch.manual_seed(0)
    model = GPT(65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"] and "lm_head.weight" not in names
    assert model.lm_head.weight is model.transformer.wte.weight
    per_layer = 2 * 128 + 12 * 128 * 128  # two LayerNorm gains, attention 4C^2, MLP 8C^2 (no biases)
    assert count_parameters(model) == 4 * per_layer + 65 * 128 + 128 + 64 * 128  # + tied wte, ln_f, wpe
    assert round((count_parameters(model) - 64 * 128) / 1e6, 2) == 0.80  # nanoGPT's "0.80M" (without wpe)
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 2e-3
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-3
    _, loss = model(torch.randint(0, 65, (2, 64)), torch.randint(0, 65, (2, 64)))
    assert abs(loss.item() - math.log(65)) < 0.1  # near-uniform predictions at init


def test_fused_softmax_is_used_or_a_clear_config_error(monkeypatch):
    try:
        import hpclm.ops  # noqa: F401
    except ImportError:
        with pytest.raises(HpclmError, match="model.softmax = 'fused' needs hpclm.ops.fused_softmax.*use model.softmax = 'sdpa' or 'torch'"):
            GPT(10, 8, n_layer=1, n_head=2, n_embd=8, softmax="fused")
        return
    from hpclm import native
    ext = native.require()
    calls = []  # the compiled kernels, not the torch fallback, compute the model's attention softmax
    for name in ("softmax_forward", "softmax_backward"):
        real = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    torch.manual_seed(0)
    fused = GPT(10, 8, n_layer=1, n_head=2, n_embd=8, softmax="fused")
    plain = GPT(10, 8, n_layer=1, n_head=2, n_embd=8, softmax="torch")
    plain.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 10, (2, 8))
    fused_loss = fused(idx, idx)[1]
    fused_loss.backward()
    assert calls == ["softmax_forward", "softmax_backward"]  # one layer: one call each way
    assert torch.allclose(fused_loss, plain(idx, idx)[1], atol=1e-5)


def test_gru_is_the_briefs_model():
    cfg = config.load(None, ["model.arch=gru", "model.n_embd=100", "model.hidden_size=128", "model.n_layer=1",
                                "model.bias=true"])
    model = build_model(cfg, vocab_size=65)
    assert isinstance(model, GRULM)
    assert (model.embedding.embedding_dim, model.gru.hidden_size, model.head.out_features) == (100, 128, 65)
    gru = 3 * (128 * 100 + 128 * 128 + 2 * 128)
    assert count_parameters(model) == 65 * 100 + gru + 128 * 65 + 65
    logits, loss = model(torch.randint(0, 65, (2, 20)), torch.randint(0, 65, (2, 20)))
    assert logits.shape == (2, 20, 65) and abs(loss.item() - math.log(65)) < 0.2
    assert model(torch.randint(0, 65, (2, 20)))[0].shape == (2, 1, 65)


def test_optimizer_groups_decay_only_matrices():
    model = GPT(30, 8, n_layer=1, n_head=2, n_embd=8, bias=True)
    opt = make_optimizer(model, config.OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule_is_nanogpts():
    o = config.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000)
    assert lr_at(0, o, 2000) == pytest.approx(1e-3 / 101)
    assert lr_at(99, o, 2000) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, o, 2000) == pytest.approx(1e-3)
    assert lr_at(1050, o, 2000) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(2000, o, 2000) == pytest.approx(1e-4) and lr_at(5000, o, 2000) == 1e-4
