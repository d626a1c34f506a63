"""hpclm._C.decode_attention (a decoding step's attention over a KV cache) on every CPU path against a
float64 reference, its batch invariance, the cache it writes, its checks, and torch's fallback."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hpclm._C", reason="hpclm._C is not built (pip install -e .)")
from hpclm.kernels.attention import decode_attention, decode_attention_available  # noqa: E402

def make_cache(n_slots, H, P, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_slots, H, P, D, generator=g, dtype=dtype),
            torch.randn(n_slots, H, P, D, generator=g, dtype=dtype))


def reference(qkv, keys, values, slots, positions):
    """float64, the new key and value in place, softmax over positions 0..position per head."""
    _, H, _, D = keys.shape
    q, k, v = qkv.double().split(H * D, dim=1)
    out = []
    for b, (s, p) in enumerate(zip(slots, positions)):
        K, V = keys[s, :, :p + 1].double().clone(), values[s, :, :p + 1].double().clone()
        K[:, p], V[:, p] = k[b].view(H, D), v[b].view(H, D)
        w = torch.softmax(torch.einsum("hd,hpd->hp", q[b].view(H, D), K) / math.sqrt(D), dim=-1)
        out.append(torch.einsum("hp,hpd->hd", w, V).reshape(H * D))
    return torch.stack(out)


@pytest.mark.parametrize("H,D,P", [(1, 1, 3), (6, 64, 192), (3, 13, 40), (2, 40, 17), (4, 80, 9)])
def test_every_path_matches_float64_and_writes_the_cache(cpu_path, H, D, P):
    keys, values = make_cache(5, H, P, D, seed=H * D + P)
    slots, positions = [3, 0, 4], [P - 1, 0, P // 2]  # last position, first, middle; slots out of order
    wide = torch.randn(3, 3 * H * D + 5)
    qkv = wide[:, 2:2 + 3 * H * D]  # rows with a stride longer than 3 H D
    before_k, before_v = keys.clone(), values.clone()
    ref = reference(qkv, keys, values, slots, positions)
    y = decode_attention(qkv, keys, values, slots, positions, H)
    assert y.shape == (3, H * D) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max().item() <= 1e-5, cpu_path
    for b, (s, p) in enumerate(zip(slots, positions)):  # the new key and value, and nothing else, written
        assert torch.equal(keys[s, :, p], qkv[b, H * D:2 * H * D].reshape(H, D))
        assert torch.equal(values[s, :, p], qkv[b, 2 * H * D:].reshape(H, D))
        before_k[s, :, p], before_v[s, :, p] = keys[s, :, p], values[s, :, p]
    assert torch.equal(keys, before_k) and torch.equal(values, before_v)


def test_a_sequence_is_the_same_alone_and_in_any_batch(cpu_path):
    H, D, P = 6, 64, 160
    keys, values = make_cache(16, H, P, D)
    qkv = torch.randn(16, 3 * H * D)
    positions = [7 * b + 3 for b in range(16)]
    together = decode_attention(qkv, keys.clone(), values.clone(), list(range(16)), positions, H)
    for rows in ([5], [0, 9], list(range(2, 14))):
        alone = decode_attention(qkv[rows], keys.clone(), values.clone(), rows, [positions[r] for r in rows], H)
        assert torch.equal(alone, together[rows]), (cpu_path, rows)


def test_bad_steps_are_refused_before_anything_is_written():
    keys, values = make_cache(4, 2, 8, 4)
    qkv, before = torch.randn(2, 24), keys.clone()
    for slots, positions, what in (([1, 1], [0, 0], "own cache slot"), ([0, 4], [0, 0], "outside"),
                                   ([0, 1], [0, 8], "outside"), ([0, 1], [-1, 0], "outside"),
                                   ([0], [0], "do not agree")):
        with pytest.raises(ValueError, match=what):
            decode_attention(qkv, keys, values, slots, positions, 2)
    with pytest.raises(ValueError, match="do not agree"):
        decode_attention(qkv, keys, values, [0, 1], [0, 0], 3)
    assert torch.equal(keys, before)


def test_gate_and_torch_fallback_agree():
    ok, why = decode_attention_available(torch.zeros(2, 2, 4, 4, dtype=torch.float64))
    assert not ok and "float32 CPU cache" in why
    assert decode_attention_available(torch.zeros(2, 2, 4, 4)) == (True, "")
    H, D, P = 3, 16, 24
    keys, values = make_cache(4, H, P, D, dtype=torch.float64)
    qkv = torch.randn(2, 3 * H * D, dtype=torch.float64)
    ref = reference(qkv, keys, values, [2, 1], [23, 5])
    fast_k, fast_v = keys.float(), values.float()
    by_torch = decode_attention(qkv, keys, values, [2, 1], [23, 5], H)
    by_kernel = decode_attention(qkv.float(), fast_k, fast_v, [2, 1], [23, 5], H)
    assert by_torch.dtype == torch.float64 and (by_torch - ref).abs().max().item() <= 1e-12
    assert (by_kernel.double() - ref).abs().max().item() <= 1e-5
    assert torch.equal(keys.float(), fast_k) and torch.equal(values.float(), fast_v)
