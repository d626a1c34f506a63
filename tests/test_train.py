"""hpclm train end to end: loss falls, exact resume, crash safety of checkpoints, refusals, 2 ranks."""
import json
import math
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
import torch

from conftest import hang_guard, REPO, child_env, mpirun, requires_horovod, run_python
from hpclm import cli, config
from hpclm.train import checkpoint, loop, train
from hpclm.errors import HpclmError
from hpclm.train.metrics import Prometheus
from hpclm.data import load_dataset
from hpclm.evaluate import split_loss
from hpclm.generate import load_trained
from helpers.lm_fixtures import TINY, one_thread, records, shakespeare_dir, tiny_config  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(data_dir, out, *overrides, **kwargs):
    return train(tiny_config(data_dir, *overrides), out, progress_bar=False, **kwargs)


def test_short_run_loss_falls_and_writes_its_outputs(shakespeare_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = _train(shakespeare_dir, out, "train.max_iters=80", "train.eval_interval=40", "train.log_interval=10",
                     "checkpoint.every_iters=20", "checkpoint.keep_last=2", "train.grad_accum=2",
                     "anomaly.rollback_steps=0")  # else pruning also keeps what a rollback 50 steps back needs
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 40, 80]
    assert evals[0]["val_loss"] == pytest.approx(math.log(65), abs=0.15)  # uniform at init
    assert evals[-1]["val_loss"] < evals[1]["val_loss"] < evals[0]["val_loss"] - 0.5
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(10, 81, 10))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    r = train[-1]
    assert r["tokens"] == 80 * 4 * 32 * 2 and r["ranks"] == 1 and r["loss_scale"] == 1.0 and r["skipped_steps"] == 0
    assert r["tokens_per_s"] == pytest.approx(4 * 32 * 2 / r["step_time_s"])
    assert r["lr"] == pytest.approx(loop.lr_at(79, tiny_config(shakespeare_dir).optim, 80))
    assert [p.name for p in checkpoint.listing(out)] == ["iter_0000060", "iter_0000080"]
    assert config.load(out / "config.toml") == tiny_config(shakespeare_dir, "train.max_iters=80", "train.eval_interval=40",
                                                             "train.log_interval=10", "checkpoint.every_iters=20",
                                                             "checkpoint.keep_last=2", "train.grad_accum=2",
                                                             "anomaly.rollback_steps=0")
    state = torch.load(checkpoint.root(out) / "iter_0000080" / "state.pt", weights_only=True)
    assert state["step"] == 80 and len(state["rng"]["torch"]) == 1
    assert summary["val_loss"] == evals[-1]["val_loss"] and summary["step"] == 80
    assert "step 80/80 | loss" in capsys.readouterr().out


@pytest.mark.parametrize("precision", [[], ["precision.dtype=fp16", "precision.init_scale=8.0", "precision.growth_interval=3"]],
                         ids=["fp32", "fp16-scaler"])
def test_resume_equals_uninterrupted_run_exactly(shakespeare_dir, tmp_path, precision):
    """fp16: the loss scale grows every 3 clean steps, so the scaler's state must survive the resume too."""
    common = ["train.eval_interval=10", "checkpoint.every_iters=10", "optim.lr_decay_iters=30", "model.dropout=0.1",
              "train.grad_accum=2", *precision]
    _train(shakespeare_dir, tmp_path / "whole", "train.max_iters=30", *common)
    _train(shakespeare_dir, tmp_path / "split", "train.max_iters=20", *common)
    summary = _train(shakespeare_dir, tmp_path / "split", "train.max_iters=30", *common)
    assert summary["start_step"] == 20
    timing = ("tokens_per_s", "step_time_s", "time")  # wall-clock figures
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    for kind in ("train", "eval"):
        assert strip(records(tmp_path / "split", kind)) == strip(records(tmp_path / "whole", kind))  # exactly equal
    a = checkpoint.load(checkpoint.resolve(tmp_path / "whole"), "model.pt")
    b = checkpoint.load(checkpoint.resolve(tmp_path / "split"), "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    scalers = [checkpoint.load(checkpoint.resolve(tmp_path / run), "state.pt")["loss_scaler"] for run in ("whole", "split")]
    assert scalers[0] == scalers[1]
    if precision:
        assert scalers[0]["scale"] > 8.0  # it grew, across the resume as in one run


def test_safetensors_weights_resume_exactly_and_read_back_tied(shakespeare_dir, tmp_path, capsys):
    """checkpoint.format = "safetensors" for the first half, "pt" after the resume: the same run as all-pt."""
    from safetensors.torch import load_file
    common = ["checkpoint.every_iters=10", "train.eval_interval=10", "model.dropout=0.1", "optim.lr_decay_iters=20"]
    _train(shakespeare_dir, tmp_path / "whole", "train.max_iters=20", *common)
    _train(shakespeare_dir, tmp_path / "split", "train.max_iters=10", *common, 'checkpoint.format="safetensors"')
    assert _train(shakespeare_dir, tmp_path / "split", "train.max_iters=20", *common)["start_step"] == 10
    half = checkpoint.root(tmp_path / "split") / "iter_0000010"
    assert {p.name for p in half.iterdir()} >= {"model.safetensors", "optimizer.pt"} and not (half / "model.pt").exists()
    assert "model.safetensors" in json.loads((half / checkpoint.MANIFEST).read_text())["files"]
    want = checkpoint.load(checkpoint.root(tmp_path / "whole") / "iter_0000010", "model.pt")
    stored = load_file(half / "model.safetensors")  # any safetensors reader: every tensor once, the tied head not again
    assert stored.keys() == want.keys() - {"lm_head.weight"} and all(torch.equal(stored[k], want[k]) for k in stored)
    got = checkpoint.load_weights(half)
    assert got.keys() == want.keys() and got["lm_head.weight"] is got["transformer.wte.weight"]
    a, b = (checkpoint.load_weights(checkpoint.resolve(tmp_path / run)) for run in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from safetensors exactly
    texts = []
    for run in ("whole", "split"):
        capsys.readouterr()
        assert cli.main(["generate", "--ckpt", str(checkpoint.root(tmp_path / run) / "iter_0000010"),
                         "--max-new-tokens", "30"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) == 1 + 30 + 1  # the prompt, 30 characters, the newline


KILL_DURING_WRITE = textwrap.dedent("""
    import os, signal, sys
    from hpclm import config
    from hpclm.train import checkpoint, train
    where = sys.argv[2]
    real_write, real_fsync = checkpoint._write, checkpoint.atomic.fsync
    def write(path, data):
        if where == "file" and path.name == "optimizer.pt" and "iter_0000020" in path.parent.name:
            real_write(path, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)  # mid-checkpoint, half a file written
        real_write(path, data)
    def fsync(path):
        if where == "rename" and (path / "iter_0000020").is_dir() and checkpoint.read_latest(path.parent) == 10:
            os.kill(os.getpid(), signal.SIGKILL)  # new folder complete, `latest` not yet replaced
        real_fsync(path)
    real_prune, real_rmtree = checkpoint.prune, checkpoint.shutil.rmtree
    def prune(run_dir, keep_last, *keep_from):
        if where == "before-prune" and checkpoint.read_latest(run_dir) == 20:
            os.kill(os.getpid(), signal.SIGKILL)  # `latest` on the new checkpoint, the old ones not yet pruned
        return real_prune(run_dir, keep_last, *keep_from)
    def rmtree(path, *a, **k):
        if where == "mid-prune" and path.name.startswith(".del-iter_0000010"):
            (path / "model.pt").unlink()
            os.kill(os.getpid(), signal.SIGKILL)  # a pruned checkpoint half deleted
        real_rmtree(path, *a, **k)
    checkpoint._write, checkpoint.atomic.fsync, checkpoint.prune, checkpoint.shutil.rmtree = write, fsync, prune, rmtree
    train(config.load(None, sys.argv[3:]), sys.argv[1], progress_bar=False)
""")


@pytest.mark.parametrize("where,latest", [("file", 10), ("rename", 10), ("before-prune", 20), ("mid-prune", 20)])
def test_kill_during_checkpoint_write_leaves_latest_complete(shakespeare_dir, tmp_path, where, latest):
    """SIGKILL inside a checkpoint's write, between it and `latest`, after `latest` but before pruning,
    and in the middle of deleting a pruned checkpoint: `latest` names a complete checkpoint every time."""
    out = tmp_path / "run"
    keep = 1 if "prune" in where else 3
    overrides = [f"data.path={json.dumps(str(shakespeare_dir))}", *TINY, "train.max_iters=30", "train.eval_interval=0",
                 "checkpoint.every_iters=10", f"checkpoint.keep_last={keep}", "anomaly.rollback_steps=0"]
    proc = run_python(["-c", KILL_DURING_WRITE, str(out), where, *overrides])
    assert proc.returncode == -9, proc.stderr
    assert checkpoint.read_latest(out) == latest
    assert checkpoint.verify(checkpoint.root(out) / f"iter_{latest:07d}") is None
    assert checkpoint.find_resumable(out, pytest.fail).name == f"iter_{latest:07d}"  # no warning needed
    summary = train(config.load(None, overrides), out, progress_bar=False)
    assert summary["start_step"] == latest and summary["step"] == 30
    kept = ["iter_0000030"] if keep == 1 else ["iter_0000010", "iter_0000020", "iter_0000030"]
    assert [p.name for p in checkpoint.listing(out)] == kept
    assert all(checkpoint.verify(p) is None for p in checkpoint.listing(out))
    assert sorted(p.name for p in checkpoint.root(out).iterdir()) == [*kept, "latest"]  # leftovers cleaned


def test_corrupt_latest_checkpoint_warns_and_resumes_from_previous(shakespeare_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _train(shakespeare_dir, out, "train.max_iters=20", "checkpoint.every_iters=10", "train.eval_interval=0")
    model = checkpoint.root(out) / "iter_0000020" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    summary = _train(shakespeare_dir, out, "train.max_iters=30", "checkpoint.every_iters=10", "train.eval_interval=0")
    assert summary["start_step"] == 10
    assert "iter_0000020 is incomplete or corrupt (model.pt has 100 bytes" in capsys.readouterr().err  # a warning: stderr
    assert [r["step"] for r in records(out, "train")] == list(range(1, 31))  # the redone steps replace the old records


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_checkpoints_of_another_model_are_refused(shakespeare_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = [f"--set=data.path={json.dumps(str(shakespeare_dir))}"] + [f"--set={o}" for o in TINY]
    argv = ["train", "--out", str(out), *base, "--set=train.max_iters=5", "--set=train.eval_interval=0"]
    assert cli.main(argv) == 0
    before = _snapshot(out)
    assert cli.main(argv + ["--set=model.n_layer=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds checkpoints of a different model (model.n_layer: 1 in the checkpoint, 2 now)" in err
    assert len(err.splitlines()) == 1
    assert cli.main(argv + ["--resume", "never"]) == 2
    assert "already has checkpoints (newest iter_0000005)" in capsys.readouterr().err
    assert _snapshot(out) == before  # nothing overwritten
    assert cli.main(argv + ["--set=model.n_layer=2", "--resume", "never", "--force"]) == 0
    state = torch.load(checkpoint.resolve(out) / "model.pt", weights_only=True)
    assert "transformer.h.1.ln_1.weight" in state


def test_check_reports_what_a_start_would_do_and_writes_nothing(shakespeare_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--out", str(out), f"--set=data.path={json.dumps(str(shakespeare_dir))}",
            *[f"--set={o}" for o in TINY], "--set=train.max_iters=3", "--set=train.eval_interval=0"]
    assert cli.main(base + ["--check"]) == 0
    assert f"would start fresh in {out}" in capsys.readouterr().out and not out.exists()
    assert cli.main(base + ["--check", "--set=model.n_layr=2"]) == 2
    assert "unknown key in [model] 'n_layr'" in capsys.readouterr().err
    assert cli.main(base + ["--check", f"--set=data.path={json.dumps(str(tmp_path / 'nowhere'))}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert cli.main(base + ["--check", "--out", str(tmp_path / "a-file" / "run")]) == 2
    assert "a-file is not a writable directory" in capsys.readouterr().err
    assert cli.main(base) == 0
    before = _snapshot(out)
    assert cli.main(base + ["--check"]) == 0
    assert f"would resume from {checkpoint.root(out) / 'iter_0000003'}" in capsys.readouterr().out
    assert cli.main(base + ["--check", "--set=model.n_layer=2"]) == 2
    assert "holds checkpoints of a different model" in capsys.readouterr().err
    assert cli.main(base + ["--check", "--resume", "never", "--force"]) == 0
    assert _snapshot(out) == before  # --force under --check deletes nothing


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_preemption_signal_checkpoints_exits_75_and_leaves_a_marker_until_resumed(shakespeare_dir, tmp_path, sig):
    """Slurm's --signal warning (USR1) and its time limit or scancel (TERM) both stop after a checkpoint."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "hpclm", "train", "--out", str(out), f"--set=data.path={json.dumps(str(shakespeare_dir))}",
            *[f"--set={o}" for o in TINY], "--set=train.max_iters=100000", "--set=train.eval_interval=0",
            "--set=checkpoint.every_iters=0"]
    proc = subprocess.Popen(argv, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + hang_guard(60)
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and records(out, "train")):
        time.sleep(0.05)
    # a train record is written inside the loop, after the handlers are installed: the signal cannot come early
    assert proc.poll() is None and records(out, "train"), "training never logged a step"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=hang_guard(60))
    assert proc.returncode == 75, err
    stopped = checkpoint.read_latest(out)
    assert stopped and (out / "preempted").read_text().strip() == str(stopped)  # what train.sbatch requeues on
    assert f"stopped after step {stopped} on {sig.name}" in err
    resume = argv[:-3] + [f"--set=train.max_iters={stopped + 2}", "--set=train.eval_interval=0"]
    assert subprocess.run(resume, env=child_env(), cwd=REPO, capture_output=True, timeout=hang_guard(120)).returncode == 0
    assert not (out / "preempted").exists() and checkpoint.read_latest(out) == stopped + 2


def test_validation_split_shorter_than_a_block_is_refused(shakespeare_dir, tmp_path):
    tiny_data = tmp_path / "tiny"
    (tmp_path / "t.txt").write_text("to be or not to be " * 30)
    cli.main(["prepare", str(tmp_path / "t.txt"), "--out", str(tiny_data)])
    with pytest.raises(HpclmError, match="the val split of .* shorter than one block"):
        _train(tiny_data, tmp_path / "run", "data.block_size=64")
    assert not (tmp_path / "run").exists()


def test_generate_eval_and_report(shakespeare_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _train(shakespeare_dir, out, "train.max_iters=40", "train.eval_interval=20", "train.eval_iters=4")
    capsys.readouterr()

    def cli_out(*argv):
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    gen = lambda *a: cli_out("generate", "--ckpt", str(out), "--max-new-tokens", "60", *a)  # noqa: E731
    one, again = gen("--seed", "1", "--prompt", "ROMEO:"), gen("--seed", "1", "--prompt", "ROMEO:")
    other = gen("--seed", "2", "--prompt", "ROMEO:")  # only the seed differs
    assert one[0] == 0, one[2]
    text = one[1][:-1]  # print's newline
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 60
    assert set(text) <= set(json.loads((shakespeare_dir / "tokenizer.json").read_text())["chars"])
    assert again[1] == one[1] and other[1] != one[1]
    code, _, err = gen("--prompt", "ü")
    assert code == 2 and "character 'ü' is not in the 65-character vocabulary" in err

    code, text, err = cli_out("eval", "--ckpt", str(out))
    assert code == 0, err
    words = text.split()
    loss, ppl = float(words[2].rstrip(",")), float(words[4])
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    assert loss == pytest.approx(records(out, "eval")[-1]["val_loss"], abs=0.15)
    assert "over 111,520 tokens" in text  # all 3485 whole blocks of 32 in the 111,540 val tokens
    code, _, err = cli_out("eval", "--ckpt", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err

    code, text, err = cli_out("report", str(out), "--out", str(tmp_path / "plots"))
    assert code == 0, err
    for name in ("loss.png", "throughput.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_prometheus_endpoint_serves_the_latest_record():
    prom = Prometheus(0)  # any free port, on 127.0.0.1
    try:
        assert prom.url.startswith("http://127.0.0.1:")
        prom.update({"kind": "train", "step": 42, "loss": 1.25, "tokens_per_s": 1000.0})
        body = urllib.request.urlopen(prom.url, timeout=10).read().decode()
        assert "hpclm_step 42.0" in body and "hpclm_loss 1.25" in body and "hpclm_tokens_per_s 1000.0" in body
        assert "hpclm_straggler_rank -1.0" in body  # none named yet (0 would name rank 0)
        prom.update({"kind": "train", "straggler_rank": 1, "compute_s_max": 0.5, "rank_compute_s": [0.2, 0.5]})
        body = urllib.request.urlopen(prom.url, timeout=10).read().decode()
        assert "hpclm_straggler_rank 1.0" in body and "hpclm_compute_s_max 0.5" in body
        with pytest.raises(HpclmError, match="cannot serve Prometheus metrics on 127.0.0.1:"):
            Prometheus(prom.server.server_port)
    finally:
        prom.close()



@requires_horovod
def test_two_ranks_under_mpirun_then_one(shakespeare_dir, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [f"data.path={json.dumps(str(shakespeare_dir))}", *TINY, "train.max_iters=40", "train.eval_interval=20",
                 "checkpoint.every_iters=20", "model.dropout=0.1"]
    script = textwrap.dedent("""
        import hashlib, json, sys, torch
        import hpclm.dist as dist
        from hpclm import config
        from hpclm.train import loop, train
        captured = {}
        real_setup = loop.setup
        def setup(*a, **k):
            captured["run"] = real_setup(*a, **k)
            return captured["run"]
        loop.setup = setup
        summary = train(config.load(None, sys.argv[2:]), sys.argv[1], progress_bar=False)
        params = b"".join(p.detach().numpy().tobytes() for p in captured["run"].model.parameters())
        with open(f"{sys.argv[1]}.rank{dist.rank()}.json", "w") as f:  # files: mpirun may interleave stdout
            json.dump({"rank": dist.rank(), "size": dist.size(), "val_loss": summary.get("val_loss"),
                       "params": hashlib.sha256(params).hexdigest()}, f)
    """)
    proc = mpirun(2, ["-c", script, str(out), *overrides])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in rows) == [0, 1] and {r["size"] for r in rows} == {2}
    assert rows[0]["params"] == rows[1]["params"]  # gradients averaged: the replicas stay identical
    assert rows[0]["val_loss"] == rows[1]["val_loss"]  # eval averaged over ranks
    train = records(out, "train")
    assert {r["ranks"] for r in train} == {2} and train[-1]["tokens"] == 40 * 2 * 4 * 32
    assert train[-1]["loss"] < train[0]["loss"] - 0.8
    assert proc.stdout.count("step 40/40 | loss") == 1  # rank 0 alone prints
    state = torch.load(checkpoint.resolve(out) / "state.pt", weights_only=True)
    assert len(state["rng"]["torch"]) == 2 and not torch.equal(*state["rng"]["torch"])  # per-rank dropout RNG

    resumed = mpirun(2, ["-m", "hpclm", "train", "--out", str(out), *[f"--set={o}" for o in overrides],
                         "--set=train.max_iters=50", "--set=train.eval_whole_val=true"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "iter_0000040" in resumed.stdout
    assert [r["step"] for r in records(out, "train")][-1] == 50
    # the whole val split's blocks shared between the 2 ranks: the same figure as one process over all of them
    last_eval = records(out, "eval")[-1]
    assert last_eval["step"] == 50 and last_eval["val_whole_split"]
    whole = split_loss(load_trained(out).model, load_dataset(shakespeare_dir).val, 32)[0]
    assert last_eval["val_loss"] == pytest.approx(whole, rel=1e-6)

    # on one rank: gradient accumulation 2 keeps the global batch of 8 (a note says so); the token count goes on
    capsys.readouterr()
    summary = _train(shakespeare_dir, out, *overrides[1:], "train.max_iters=52")
    assert ("the checkpoint was written by 2 ranks, this run has 1: train.grad_accum becomes 2 to keep the global "
            "batch of 8 sequences") in capsys.readouterr().out
    last = records(out, "train")[-1]
    assert summary["start_step"] == 50 and last["step"] == 52 and last["ranks"] == 1
    assert last["tokens"] == 52 * 2 * 4 * 32  # 50 steps of 2 ranks x 4, then 2 of one rank x 4 x 2 micro-batches
    assert torch.load(checkpoint.resolve(out) / "state.pt", weights_only=True)["tokens"] == last["tokens"]


def test_target_val_loss_stops_at_the_first_whole_split_eval_that_reaches_it(shakespeare_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = _train(shakespeare_dir, out, "train.max_iters=300", "train.eval_interval=10", "train.eval_whole_val=true",
                     "train.target_val_loss=3.0", "train.eval_at_start=false", "checkpoint.every_iters=0")
    evals = records(out, "eval")
    steps = [r["step"] for r in evals]
    assert steps == list(range(10, steps[-1] + 1, 10)) and steps[-1] < 300  # no eval at step 0; stopped early
    assert evals[-1]["val_loss"] <= 3.0 < min(r["val_loss"] for r in evals[:-1])
    assert all(r["val_whole_split"] for r in evals) and records(out, "train")[-1]["step"] == steps[-1]
    assert summary["target_reached_step"] == steps[-1] == checkpoint.step_of(checkpoint.resolve(out))
    assert f"<= train.target_val_loss = 3.0 at step {steps[-1]}: stopping" in capsys.readouterr().out
    # the eval's figure is hpclm eval's: every block of val.bin, scored by the checkpoint written at the stop
    whole = split_loss(load_trained(out).model, load_dataset(shakespeare_dir).val, 32)[0]
    assert evals[-1]["val_loss"] == pytest.approx(whole, rel=1e-6)


def test_compile_trains_like_eager_and_caches_its_code(shakespeare_dir, tmp_path, monkeypatch):
    """train.compile: inductor's code for the forward and backward, our fused softmax traced as its custom op."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    common = ["train.max_iters=6", "train.eval_interval=0", "checkpoint.every_iters=0", 'model.softmax="fused"']
    eager = _train(shakespeare_dir, tmp_path / "eager", *common)
    compiled = _train(shakespeare_dir, tmp_path / "compiled", *common, "train.compile=true")
    losses = [[r["loss"] for r in records(tmp_path / run, "train")] for run in ("eager", "compiled")]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)
    assert any((tmp_path / "cache").rglob("*.py"))  # the generated code, on disk for the next run


def test_gru_trains_and_generates(shakespeare_dir, tmp_path):
    out = tmp_path / "gru"
    _train(shakespeare_dir, out, "model.arch=gru", "model.n_embd=16", "model.hidden_size=32", "model.n_layer=1",
           "train.max_iters=60", "train.eval_interval=30", "train.batch_size=8")
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    from hpclm.generate import generate_text, load_trained
    trained = load_trained(out)
    assert trained.cfg.model.arch == "gru" and trained.step == 60
    assert len(generate_text(trained, "KING", max_new_tokens=40, seed=3)) == 44


def test_precision_bf16_runs_and_cuda_needs_a_device(shakespeare_dir, tmp_path, capsys, monkeypatch):
    """(fp16 with loss scaling: tests/test_data_parallel.py)"""
    seen, real_setup = set(), loop.setup

    def setup(*a, **k):  # the dtype the model's matmuls produce while training
        run = real_setup(*a, **k)
        for m in run.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype) if mod.training else None)
        return run
    monkeypatch.setattr(loop, "setup", setup)
    _train(shakespeare_dir, tmp_path / "bf16", "precision.dtype=bf16", "train.max_iters=30", "train.eval_interval=15")
    assert seen == {torch.bfloat16}  # autocast really ran the matmuls in bfloat16
    assert "fp16 on a CPU" not in capsys.readouterr().out
    _train(shakespeare_dir, tmp_path / "fp16", "precision.dtype=fp16", "train.max_iters=1", "train.eval_interval=0")
    assert "note: fp16 on a CPU converts around every op" in capsys.readouterr().out
    evals = records(tmp_path / "bf16", "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    if not torch.cuda.is_available():
        with pytest.raises(HpclmError, match="train.device = 'cuda' but torch sees no CUDA device"):
            _train(shakespeare_dir, tmp_path / "cuda", "train.device=cuda")
