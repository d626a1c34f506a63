"""nanoGPT's checkpoints as hpclm models: ckpt.pt files written the way nanoGPT's train.py writes them, by
nanoGPT's own model code (tests/third_party/nanogpt), read by `--ckpt nanogpt:PATH` and `init.from`."""
import importlib.util
import json
import pickle
import shutil
from pathlib import PurePosixPath

import pytest
import torch

from conftest import REPO, horovod_available, mpirun
from helpers.lm_fixtures import SHAKESPEARE, one_thread, shakespeare_dir  # noqa: F401 (fixtures)
from hpclm import cli
from hpclm.generate import load_trained
from hpclm.train import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=None, dropout=0.0)
ITERS = 6  # AdamW updates nanoGPT's model takes before its checkpoint


def _nanogpt():
    spec = importlib.util.spec_from_file_location("nanogpt_model", REPO / "tests" / "third_party" / "nanogpt" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_like_train_py(out_dir, model, optimizer, model_args, iter_num):
    """The checkpoint dict nanoGPT's train.py saves (raw_model: the compiled wrapper when compile=True)."""
    out_dir.mkdir(parents=True)
    config = {"out_dir": out_dir.name, "dataset": "shakespeare_char", "batch_size": 4, "block_size": 32,
              "learning_rate": 1e-3, "weight_decay": 0.1, "compile": False}
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": iter_num, "best_val_loss": torch.tensor(4.0), "config": config}, out_dir / "ckpt.pt")


@pytest.fixture(scope="module")
def nanogpt_runs(tmp_path_factory):
    """A nanoGPT checkout's layout: data/shakespeare_char/meta.pkl (as its prepare.py writes it) and three
    out_dirs holding the same trained weights: plain, compiled (torch.compile), and the manual attention path."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found (the project's shared data)")
    root = tmp_path_factory.mktemp("nanogpt")
    text = SHAKESPEARE.read_text()
    chars = sorted(set(text))
    stoi, itos = {ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars))
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    with open(root / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)

    nano = _nanogpt()
    args = {**ARGS, "vocab_size": len(chars)}
    torch.manual_seed(0)
    model = nano.GPT(nano.GPTConfig(**args))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    ids = torch.tensor([stoi[c] for c in text[:20000]])
    for _ in range(ITERS):
        starts = torch.randint(0, len(ids) - 33, (4,))
        x = torch.stack([ids[s:s + 32] for s in starts])
        y = torch.stack([ids[s + 1:s + 33] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    _save_like_train_py(root / "out-plain", model, optimizer, args, ITERS)
    _save_like_train_py(root / "out-compiled", torch.compile(model), optimizer, args, ITERS)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    del torch.nn.functional.scaled_dot_product_attention  # nanoGPT then builds its manual path, mask buffer and all
    try:
        manual = nano.GPT(nano.GPTConfig(**args))
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    assert not manual.transformer.h[0].attn.flash
    manual.load_state_dict(model.state_dict(), strict=False)
    manual.eval()
    _save_like_train_py(root / "out-manual", manual, optimizer, args, ITERS)
    return root, {"plain": model, "manual": manual}, optimizer, itos


def test_plain_compiled_and_manual_checkpoints_compute_nanogpts_logits(nanogpt_runs):
    root, models, _, _ = nanogpt_runs
    keys = {name: torch.load(root / f"out-{name}" / "ckpt.pt", weights_only=True)["model"].keys()
            for name in ("compiled", "manual")}
    assert all(k.startswith("_orig_mod.") for k in keys["compiled"])  # what the loader has to strip and drop
    assert "transformer.h.0.attn.bias" in keys["manual"]
    ids = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(1))
    for name, theirs in (("plain", models["plain"]), ("compiled", models["plain"]), ("manual", models["manual"])):
        trained = load_trained(f"nanogpt:{root / f'out-{name}'}")
        assert trained.cfg.model.bias and trained.cfg.model.activation == "gelu" and trained.cfg.data.block_size == 32
        with torch.no_grad():
            want, ours = theirs(ids, ids)[0], trained.model(ids, ids)[0]
        assert (want - ours).abs().max().item() <= 1e-5, name


def test_generate_and_eval_read_a_nanogpt_checkpoint(nanogpt_runs, shakespeare_dir, tmp_path, capsys):  # noqa: F811
    root, models, _, itos = nanogpt_runs
    spec = f"nanogpt:{root / 'out-compiled' / 'ckpt.pt'}"
    capsys.readouterr()
    assert cli.main(["generate", "--ckpt", spec, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--top-k", "1"]) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    stoi = {c: i for i, c in itos.items()}
    torch.manual_seed(0)  # top_k=1 leaves one token to draw: the seed cannot matter
    idx = models["plain"].generate(torch.tensor([[stoi[c] for c in "ROMEO:"]]), 40, top_k=1)
    assert ours == "".join(itos[int(i)] for i in idx[0])
    # hpclm's char tokenizer of the same text numbers characters as nanoGPT's meta.pkl does
    data = tmp_path / "data"
    assert cli.main(["prepare", str(SHAKESPEARE), "--out", str(data), "--tokenizer-from", spec]) == 0
    sha = json.loads((data / "meta.json").read_text())["tokenizer_sha256"]
    assert sha == json.loads((shakespeare_dir / "meta.json").read_text())["tokenizer_sha256"]
    capsys.readouterr()
    assert cli.main(["eval", "--ckpt", spec, "--data", str(data)]) == 0
    loss = float(capsys.readouterr().out.split()[2].rstrip(","))
    assert 2.0 < loss < 4.17  # trained a little: better than uniform over 65 characters


def _sets(data_dir, spec, *extra):
    sets = [f"data.path={json.dumps(str(data_dir))}", "data.block_size=32", "model.n_layer=2", "model.n_head=2",
            "model.n_embd=32", "model.bias=true", f"init.from={json.dumps(spec)}", "train.batch_size=4",
            "train.eval_interval=0", "optim.weight_decay=0.05", "optim.beta2=0.95", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_init_from_nanogpt_takes_its_weights_and_its_adamw_state(nanogpt_runs, shakespeare_dir, tmp_path, capsys,
                                                                 monkeypatch):  # noqa: F811
    root, models, nano_opt, _ = nanogpt_runs
    spec = f"nanogpt:{root / 'out-compiled'}"
    frozen = ["optim.lr=1e-30", "optim.min_lr=1e-30", "train.max_iters=1"]
    from hpclm.interop import nanogpt
    reads, real_load = [], nanogpt.load_checkpoint
    monkeypatch.setattr(nanogpt, "load_checkpoint", lambda path: reads.append(path) or real_load(path))
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path / "run"), *_sets(shakespeare_dir, spec, *frozen)]) == 0
    assert len(reads) == 1  # checked and loaded from one read
    out = capsys.readouterr().out
    assert f"starting from the weights of {spec}" in out and f"AdamW continues from that checkpoint's state ({ITERS} updates)" in out
    ckpt = checkpoint.resolve(tmp_path / "run")
    weights, opt = checkpoint.load(ckpt, "model.pt"), checkpoint.load(ckpt, "optimizer.pt")
    theirs = models["plain"].state_dict()
    assert max((weights[k] - theirs[k]).abs().max().item() for k in weights) < 1e-20  # lr 1e-30 moved nothing
    assert {int(s["step"]) for s in opt["state"].values()} == {ITERS + 1}  # nanoGPT's updates, and this one
    first_sq = nano_opt.state_dict()["state"][0]["exp_avg_sq"]
    assert torch.all(opt["state"][0]["exp_avg_sq"] >= 0.95 * first_sq * (1 - 1e-6))  # hpclm's beta2 on their moment
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.05, 0.0] and opt["param_groups"][0]["betas"][1] == 0.95

    # another layout (one group instead of decayed + not): the weights still, AdamW fresh, and it says so
    odd = tmp_path / "odd"
    shutil.copytree(root / "out-plain", odd)
    ck = torch.load(odd / "ckpt.pt", weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    ck["optimizer"]["param_groups"] = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}]
    torch.save(ck, odd / "ckpt.pt")
    shutil.copy(root / "data" / "shakespeare_char" / "meta.pkl", odd / "meta.pkl")  # found beside ckpt.pt too
    capsys.readouterr()
    assert cli.main(["train", "--out", str(tmp_path / "run-odd"), *_sets(shakespeare_dir, f"nanogpt:{odd}", *frozen)]) == 0
    assert "is not used (its parameter groups hold [" in capsys.readouterr().out
    opt = checkpoint.load(checkpoint.resolve(tmp_path / "run-odd"), "optimizer.pt")
    assert {int(s["step"]) for s in opt["state"].values()} == {1}

    if horovod_available():  # 2 ranks: rank 0 reads ckpt.pt; the start broadcast gives rank 1 weights and AdamW state
        script = ("import sys, torch, hpclm.dist as dist; from pathlib import Path; from hpclm import config; "
                  "from hpclm.train import loop; "
                  "run = loop.setup(config.load(None, sys.argv[2:]), Path(sys.argv[1]), 'never', False, print); "
                  "torch.save([run.model.state_dict(), run.optimizer.state_dict()], f'{sys.argv[1]}.rank{dist.rank()}.pt')")
        two = tmp_path / "two"
        sets = _sets(shakespeare_dir, spec, "train.max_iters=1")[1::2]
        proc = mpirun(2, ["-c", script, str(two), *sets])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        (w0, o0), (w1, o1) = (torch.load(f"{two}.rank{rank}.pt") for rank in (0, 1))
        assert all(torch.equal(w1[k], theirs[k]) and torch.equal(w0[k], theirs[k]) for k in theirs)
        assert o1["state"].keys() == o0["state"].keys() and len(o1["state"]) == len(nano_opt.state_dict()["state"])
        assert all(torch.equal(o1["state"][i][key], o0["state"][i][key]) for i in o0["state"]
                   for key in ("step", "exp_avg", "exp_avg_sq"))
        assert int(o1["state"][0]["step"]) == ITERS


def test_bad_nanogpt_checkpoints_are_one_line(nanogpt_runs, shakespeare_dir, tmp_path, capsys):  # noqa: F811
    root, _, _, _ = nanogpt_runs
    plain = torch.load(root / "out-plain" / "ckpt.pt", weights_only=True)

    def folder(name, ckpt=None, raw=None, meta=True):
        d = tmp_path / name
        d.mkdir()
        if raw is not None:
            (d / "ckpt.pt").write_bytes(raw)
        elif ckpt is not None:
            torch.save(ckpt, d / "ckpt.pt")
        if meta:
            shutil.copy(root / "data" / "shakespeare_char" / "meta.pkl", d / "meta.pkl")
        return f"nanogpt:{d}"

    narrow = {**plain, "model_args": {**plain["model_args"], "n_embd": 16}}
    cases = [
        (folder("empty", meta=False), "does not exist: give nanoGPT's ckpt.pt or the out_dir that holds it"),
        (folder("garbage", raw=b"not a checkpoint"), "does not load as a torch checkpoint"),
        (folder("hpclm", {"model": plain["model"]}), "is not a nanoGPT checkpoint (train.py's ckpt.pt holds 'model' and 'model_args')"),
        (folder("nometa", plain, meta=False), "no meta.pkl (nanoGPT's character vocabulary)"),
        (folder("narrow", narrow), "has shape (65, 32), model_args make it (65, 16)"),
        (folder("layer-short", {**plain, "model": {k: v for k, v in plain["model"].items() if ".h.1." not in k}}),
         "has no tensor 'transformer.h.1.ln_1.weight'"),
    ]
    evil = tmp_path / "evil"
    shutil.copytree(root / "out-plain", evil)
    (evil / "meta.pkl").write_bytes(pickle.dumps({"itos": PurePosixPath("x")}))  # a class: nothing in it may run
    cases.append((f"nanogpt:{evil}", "is not nanoGPT's meta.pkl (UnpicklingError: it names"))
    for spec, words in cases:
        for argv in (["generate", "--ckpt", spec], ["eval", "--ckpt", spec, "--data", str(shakespeare_dir)]):
            capsys.readouterr()
            assert cli.main(argv) == 2, (argv, words)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and words in err[0], (argv, err)
    # init.from of another shape: refused before anything is written
    capsys.readouterr()
    spec = f"nanogpt:{root / 'out-plain'}"
    assert cli.main(["train", "--out", str(tmp_path / "run"), *_sets(shakespeare_dir, spec, "model.n_embd=64")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.n_embd = 64 here but 32 in that model: set model.n_embd = 32" in err[0], err
    assert not (tmp_path / "run").exists()
