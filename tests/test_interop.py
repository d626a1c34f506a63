"""transformers' GPT-2 format: `hpclm export` checked against transformers itself, `--ckpt hf:DIR` reading
what transformers writes, the round trip, and bad folders as one line."""
import json

import pytest
import torch

from helpers.lm_fixtures import TINY, one_thread, shakespeare_dir, tiny_config  # noqa: F401 (fixtures)
from conftest import horovod_available, mpirun
from hpclm import cli
from hpclm.generate import generate_text, load_trained
from hpclm.train import train

transformers = pytest.importorskip("transformers", reason="transformers is not installed (scripts/setup.sh installs it)")
pytestmark = pytest.mark.usefixtures("one_thread")

GPT = [*TINY, "model.n_layer=2", "model.dropout=0.1", "train.max_iters=30", "train.eval_interval=0"]


def _train(data_dir, out, *extra):
    train(tiny_config(data_dir, *GPT, *extra), out, progress_bar=False)
    return out


@pytest.fixture(scope="module")
def char_run(shakespeare_dir, tmp_path_factory):  # noqa: F811
    """A shakespeare-char GPT without biases (hpclm's default), exported."""
    run = _train(shakespeare_dir, tmp_path_factory.mktemp("char") / "run")
    folder = run.parent / "hf"
    assert cli.main(["export", "--ckpt", str(run), "--out", str(folder)]) == 0
    return run, folder


def _logits_both(folder, trained, vocab, block):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, vocab, (3, block), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return hf_model, hf_model(ids).logits, trained.model(ids, ids)[0]


def test_transformers_computes_the_exported_gpt_and_reads_its_tokenizer(char_run):
    run, folder = char_run
    trained = load_trained(run)
    hf_model, theirs, ours = _logits_both(folder, trained, 65, 32)
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    assert (theirs - ours).abs().max().item() <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "ROMEO:\nWhat, art thou there?"
    assert tok(text)["input_ids"] == trained.tokenizer.encode(text).tolist()
    assert tok.decode(trained.tokenizer.encode(text).tolist()) == text
    # greedy decoding: transformers' generate and hpclm's (top-k 1) pick the same tokens
    prompt = tok("ROMEO:", return_tensors="pt")["input_ids"]
    greedy = hf_model.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0)
    ours_text = generate_text(trained, "ROMEO:", max_new_tokens=20, top_k=1)
    assert tok.decode(greedy[0].tolist()) == ours_text


def test_round_trip_gives_every_tensor_and_the_same_eval(char_run, capsys):
    run, folder = char_run
    original, back = load_trained(run), load_trained(f"hf:{folder}")
    a, b = original.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bias-free, as the run was
    assert back.cfg.model == original.cfg.model and back.tokenizer.sha256 == original.tokenizer.sha256
    results = []
    for ckpt in (str(run), f"hf:{folder}"):
        assert cli.main(["eval", "--ckpt", ckpt]) == 0
        results.append(capsys.readouterr().out.split(" over ")[0])  # "val loss L, perplexity P"
    assert results[0] == results[1]


def test_a_bpe_gpt_with_biases_and_gpt2s_gelu_exports_exactly(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("The quick brown fox jumps over the lazy dog; so it goes, again and again.\n" * 300)
    assert cli.main(["prepare", str(src), "--out", str(tmp_path / "data"), "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
    run = _train(tmp_path / "data", tmp_path / "run", "model.bias=true", 'model.activation="gelu_tanh"',
                 "data.block_size=16")
    assert cli.main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu_new"
    trained = load_trained(run)
    _, theirs, ours = _logits_both(tmp_path / "hf", trained, trained.tokenizer.vocab_size, 16)
    assert (theirs - ours).abs().max().item() <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the lazy fox, again"
    assert tok(text)["input_ids"] == trained.tokenizer.encode(text).tolist()


def test_a_gpt2_made_by_transformers_is_read_as_a_checkpoint(char_run, tmp_path, capsys):
    """GPT-2 as transformers builds it (biases, gelu_new), saved by save_pretrained with a tokenizer."""
    _, exported = char_run
    config = transformers.GPT2Config(vocab_size=65, n_positions=24, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and LayerNorm gains away from their init, so a dropped one shows
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text((exported / "tokenizer.json").read_text())  # the char vocabulary
    trained = load_trained(f"hf:{folder}")
    assert trained.cfg.model.bias and trained.cfg.model.activation == "gelu_tanh"
    ids = torch.randint(0, 65, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids).logits - trained.model(ids, ids)[0]).abs().max().item() <= 1e-5
    capsys.readouterr()
    assert cli.main(["generate", "--ckpt", f"hf:{folder}", "--max-new-tokens", "10", "--prompt", "A"]) == 0
    assert len(capsys.readouterr().out) == 1 + 10 + 1
    assert cli.main(["eval", "--ckpt", f"hf:{folder}"]) == 2
    assert "names no dataset of its own: give --data" in capsys.readouterr().err


def _edited(src, dst, **changes):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "hpclm_config.toml").unlink()
    return dst


def test_bad_folders_are_one_line(char_run, tmp_path, capsys):
    _, folder = char_run
    no_weights = _edited(folder, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    cases = [
        (tmp_path / "nowhere", "is not a folder"),
        (no_weights, "has no model.safetensors"),
        (_edited(folder, tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"]), "hpclm reads GPT-2"),
        (_edited(folder, tmp_path / "relu", activation_function="relu"), "activation_function 'relu'"),
        (_edited(folder, tmp_path / "deeper", n_layer=3), "has no tensor 'h.2.ln_1.weight'"),
        (_edited(folder, tmp_path / "eps", layer_norm_epsilon=1e-6), "layer_norm_epsilon = 1e-06"),
    ]
    capsys.readouterr()
    for path, words in cases:
        code = cli.main(["generate", "--ckpt", f"hf:{path}", "--max-new-tokens", "1"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], (path, lines)


def test_export_refuses_to_overwrite_and_models_gpt2_cannot_hold(char_run, shakespeare_dir, tmp_path, capsys):  # noqa: F811
    run, folder = char_run
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert cli.main(["export", "--ckpt", str(run), "--out", str(folder)]) == 2
    assert "already exists: pick another --out, or replace it with --force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert cli.main(["export", "--ckpt", str(run), "--out", str(folder), "--force"]) == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the same run gives the same files
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    gru = _train(shakespeare_dir, tmp_path / "gru", "model.arch=gru", "model.hidden_size=16", "train.max_iters=2")
    capsys.readouterr()
    assert cli.main(["export", "--ckpt", str(gru), "--out", str(tmp_path / "gru_hf")]) == 2
    assert "holds a gru model; only gpt exports" in capsys.readouterr().err
    assert not (tmp_path / "gru_hf").exists()


@pytest.fixture(scope="module")
def gpt2_with_bpe(tmp_path_factory):
    """A small random GPT-2 made by transformers, with a 512-token BPE of Tiny Shakespeare as its tokenizer."""
    from helpers.lm_fixtures import SHAKESPEARE
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found (the project's shared data)")
    root = tmp_path_factory.mktemp("finetune")
    assert cli.main(["prepare", str(SHAKESPEARE), "--out", str(root / "bpe"), "--tokenizer", "bpe",
                     "--vocab-size", "512"]) == 0
    vocab = json.loads((root / "bpe" / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32,
                                                                 n_layer=2, n_head=2))
    model.save_pretrained(root / "gpt2")
    (root / "gpt2" / "tokenizer.json").write_text((root / "bpe" / "tokenizer.json").read_text())
    return root, model


def _val_loss(capsys, *argv):
    capsys.readouterr()
    assert cli.main(["eval", *argv]) == 0
    return float(capsys.readouterr().out.split()[2].rstrip(","))


def test_fine_tuning_a_gpt2_lowers_its_loss_and_exports_again(gpt2_with_bpe, capsys):
    from helpers.lm_fixtures import SHAKESPEARE
    root, _ = gpt2_with_bpe
    spec = f"hf:{root / 'gpt2'}"
    data = root / "data"
    assert cli.main(["prepare", str(SHAKESPEARE), "--out", str(data), "--tokenizer-from", spec]) == 0
    assert json.loads((data / "meta.json").read_text())["tokenizer_sha256"] == \
        json.loads((root / "bpe" / "meta.json").read_text())["tokenizer_sha256"]  # the folder's tokenizer
    before = _val_loss(capsys, "--ckpt", spec, "--data", str(data))
    sets = [f"data.path={json.dumps(str(data))}", "data.block_size=32", "model.n_layer=2", "model.n_head=2",
            "model.n_embd=32", "model.bias=true", 'model.activation="gelu_tanh"', f"init.from={json.dumps(spec)}",
            "train.max_iters=50", "train.batch_size=8", "train.eval_interval=0", "optim.lr=3e-3", "optim.warmup_iters=5"]
    run = root / "run"
    assert cli.main(["train", "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    assert f"starting from the weights of {spec}" in capsys.readouterr().out
    after = _val_loss(capsys, "--ckpt", str(run))
    assert after < before - 0.3, (before, after)
    # one step at lr 1e-30 moves no weight by more than about that: the run started from the folder's weights
    frozen = root / "frozen"
    assert cli.main(["train", "--out", str(frozen), *[a for s in sets for a in ("--set", s)], "--set", "optim.lr=1e-30",
                     "--set", "optim.min_lr=1e-30", "--set", "train.max_iters=1"]) == 0
    a, b = load_trained(frozen).model.state_dict(), load_trained(spec).model.state_dict()
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-20
    if horovod_available():  # 2 ranks: rank 0 reads the folder, the start broadcast gives rank 1 the weights
        script = ("import sys, torch, hpclm.dist as dist; from pathlib import Path; from hpclm import config; "
                  "from hpclm.train import loop; "
                  "run = loop.setup(config.load(None, sys.argv[2:]), Path(sys.argv[1]), 'never', False, print); "
                  "torch.save(run.model.state_dict(), f'{sys.argv[1]}.rank{dist.rank()}.pt')")
        two = root / "two"
        proc = mpirun(2, ["-c", script, str(two), *sets])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        for rank in (0, 1):
            c = torch.load(f"{two}.rank{rank}.pt")
            assert all(torch.equal(c[k], b[k]) for k in b), rank
    assert cli.main(["export", "--ckpt", str(run), "--out", str(root / "tuned")]) == 0
    trained = load_trained(run)
    _, theirs, ours = _logits_both(root / "tuned", trained, trained.tokenizer.vocab_size, 32)
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_init_from_refuses_another_shape_or_tokenizer_before_writing(gpt2_with_bpe, shakespeare_dir, tmp_path, capsys):  # noqa: F811
    root, _ = gpt2_with_bpe
    spec = json.dumps(f"hf:{root / 'gpt2'}")
    base = ["data.block_size=32", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.bias=true",
            'model.activation="gelu_tanh"', f"init.from={spec}"]
    cases = [([f"data.path={json.dumps(str(root / 'bpe'))}", *base, "model.n_layer=3"],
              "model.n_layer = 3 here but 2 in that model: set model.n_layer = 2"),
             ([f"data.path={json.dumps(str(shakespeare_dir))}", *base], "was tokenized with another tokenizer"),
             ([f"data.path={json.dumps(str(root / 'bpe'))}", *base[:-1], 'init.from="gpt2"'], "init.from must be")]
    for sets, words in cases:
        for check in ([], ["--check"]):
            capsys.readouterr()
            assert cli.main(["train", *check, "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and words in err[0], err
            assert not (tmp_path / "run").exists()
