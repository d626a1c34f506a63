"""The incremental decoders (hpclm.infer) against full recomputation, and the sampling rules."""
from __future__ import annotations

import pytest
import torch

from hpclm.generate import sample
from hpclm.infer import SamplingParams, generate_ids, make_decoder, next_token, next_tokens
from hpclm.models import GPT, GRULM, HMMLM, NgramLM
from hpclm.serve.scheduler import TextStream


def _models():
    torch.manual_seed(0)
    gpt = GPT(40, 16, n_layer=2, n_head=2, n_embd=32, bias=True)
    gru = GRULM(40, 16, embd=12, hidden_size=24, n_layer=2)
    ngram = NgramLM(40, order=3, block_size=16).fit(torch.randint(0, 40, (3000,)).numpy())
    with torch.no_grad():  # weights of a trained model's size, so the logits (and the tokens drawn) differ by context
        for p in [*gpt.parameters(), *gru.parameters()]:
            p.mul_(10)
    hmm = HMMLM(40, states=8, block_size=16).randomize(torch.ones(40) / 40, torch.Generator().manual_seed(0))
    return {"gpt": gpt.eval(), "gru": gru.eval(), "ngram": ngram.eval(), "hmm": hmm.eval()}


MODELS = _models()


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("params", [SamplingParams(0.8, 200), SamplingParams(1.0, 5, 0.9)], ids=["topk", "topp"])
def test_incremental_tokens_equal_full_recompute_past_the_window(arch, params):
    model, prompt = MODELS[arch], [3, 1, 4, 1, 5]
    # 40 new tokens: 11 inside the 16-token window, the rest slide as full recomputation does
    ref = sample(model, torch.tensor([prompt]), 40, params.temperature, params.top_k, torch.Generator().manual_seed(7),
                 params.top_p)[0].tolist()
    assert generate_ids(model, prompt, 40, params, torch.Generator().manual_seed(7)) == ref


@pytest.mark.parametrize("arch", ["gpt", "gru"])
def test_chunked_prefill_and_batched_decode_equal_one_sequence_alone(arch):
    model = MODELS[arch]
    dec = make_decoder(model, 4)
    dec.prefill(2, [1, 2, 3])
    chunked = dec.prefill(2, [4, 5, 6])  # a second chunk continues the first
    dec.prefill(0, [7])
    dec.prefill(3, [8, 9, 10, 11, 12])
    batched = dec.decode([0, 2, 3], [1, 1, 1])  # three lengths in one step, slots not contiguous
    alone = make_decoder(model, 1)
    assert torch.allclose(chunked, alone.prefill(0, [1, 2, 3, 4, 5, 6]), rtol=1e-5, atol=1e-4)
    for row, seq in zip(batched, ([7, 1], [1, 2, 3, 4, 5, 6, 1], [8, 9, 10, 11, 12, 1])):
        alone.release(0)
        assert torch.allclose(row, alone.prefill(0, seq), rtol=1e-5, atol=1e-4)
    dec.release(2)  # a released slot starts a new sequence
    assert torch.allclose(dec.prefill(2, [7, 1]), batched[0], rtol=1e-5, atol=1e-4)
    full = torch.stack([model(torch.tensor([s]))[0][0, -1] for s in ([7, 1, 2], [8, 9, 10, 11, 12, 1, 2])])
    assert torch.allclose(dec.decode([0, 3], [2, 2]), full, rtol=1e-5, atol=1e-4)  # contiguous slots: the cache's view


def test_a_sequence_longer_than_the_window_is_refused_by_the_cache():
    dec = make_decoder(MODELS["gpt"], 1)
    dec.prefill(0, list(range(16)))
    with pytest.raises(Exception, match="does not fit the model's context window of 16"):
        dec.decode([0], [1])


def test_a_batch_of_rows_gets_the_tokens_each_row_gets_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 40)
    logits[4, [3, 9]] = 100.0  # a tie: the first index, alone and batched
    params = [SamplingParams(0.0), SamplingParams(0.9, 5), SamplingParams(0.0), SamplingParams(1.3, 0, 0.7),
              SamplingParams(0.0), SamplingParams(0.5)]
    alone = [next_token(row, p, torch.Generator().manual_seed(i)) for i, (row, p) in enumerate(zip(logits, params))]
    batched = next_tokens(logits, params, [torch.Generator().manual_seed(i) for i in range(6)])
    assert batched == alone and batched[4] == 3
    greedy = [SamplingParams(0.0)] * 6
    assert next_tokens(logits, greedy, [None] * 6) == logits.argmax(dim=-1).tolist() != [0] * 6


def test_greedy_top_k_and_top_p():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert next_token(logits, SamplingParams(0.0)) == 1
    drawn = {next_token(logits, SamplingParams(1.0, 2), torch.Generator().manual_seed(s)) for s in range(200)}
    assert drawn == {1, 2}
    # probabilities 0.63, 0.23, 0.09, 0.05: top_p 0.8 keeps the first two, 0.5 only the first
    drawn = {next_token(logits, SamplingParams(1.0, 0, 0.8), torch.Generator().manual_seed(s)) for s in range(200)}
    assert drawn == {1, 2}
    assert {next_token(logits, SamplingParams(1.0, 0, 0.5), torch.Generator().manual_seed(s)) for s in range(50)} == {1}
    with pytest.raises(Exception, match="top_p must be in"):
        SamplingParams(1.0, 0, 0.0).check()


class _Chars:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_what_may_start_a_stop_string():
    stream, sent = TextStream(_Chars(), ("END",)), []
    for ch in "abEN":
        sent.append(stream.add(ord(ch)))
    assert sent == [("a", False), ("b", False), ("", False), ("", False)]  # "EN" may become END
    assert stream.add(ord("x")) == ("ENx", False)
    rest = [stream.add(ord(c)) for c in "yEND"]
    assert "".join(p for p, _ in rest) == "y" and rest[-1][1] and stream.text == "abENxy"
    s2 = TextStream(_Chars(), ("\n\n",))
    assert s2.add(ord("a")) == ("a", False) and s2.add(ord("\n")) == ("", False) and s2.flush() == "\n"
