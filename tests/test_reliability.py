"""Nothing lost, nothing half-done, no traceback: what a hostile user does, and what hpclm guarantees.

Every bad input below is one line on stderr, exit code 2, no "Traceback", and nothing under OUT or the
data directory changed. Every data-loss case trains for real and looks at what is on disk afterwards.
"""
import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from conftest import hang_guard, REPO, child_env, mpirun, run_python, run_with_read_only
from helpers.lm_fixtures import TINY, one_thread, records, shakespeare_dir  # noqa: F401 (fixtures)
from hpclm import cli
from hpclm.train import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is the fastest


def _snapshot(*roots):
    """Every file (bytes) and folder under the roots: what must not change."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.exists() else []:
            out[str(p)] = p.read_bytes() if p.is_file() else "dir"
    return out


def _sets(data_dir, *extra):
    return [a for kv in [f"data.path={json.dumps(str(data_dir))}", *TINY, *extra] for a in ("--set", kv)]


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def hpclm(*argv):
    """`hpclm ARGV` in this process (no interpreter and torch start-up per call), as a CompletedProcess:
    exit code, stdout, stderr. Anything but a one-line error escapes as the exception it is."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return subprocess.CompletedProcess(["hpclm", *argv], code, out.getvalue(), err.getvalue())


def _train(data_dir, out, *extra):
    return hpclm("train", "--out", out, *_sets(data_dir, *extra))


@pytest.fixture(scope="module")
def trained_run(shakespeare_dir, tmp_path_factory):  # noqa: F811
    """A tiny GPT run with checkpoints at steps 2 and 4 (copied by tests that change it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = _train(shakespeare_dir, out, "train.max_iters=4", "checkpoint.every_iters=2", "train.eval_interval=0")
    assert proc.returncode == 0, proc.stderr
    return out


def _copy_run(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out


def _tamper(ckpt, fname, data: bytes):
    """Replace one file of a checkpoint and its manifest entry: the hashes pass, the contents do not."""
    (ckpt / fname).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


# --- data loss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_diverged_weights_are_never_checkpointed(shakespeare_dir, tmp_path, precision):  # noqa: F811
    out = tmp_path / "run"
    lr = {"fp32": "optim.lr=100.0", "fp16": "optim.lr=10.0"}[precision]
    proc = _train(shakespeare_dir, out, lr, "optim.min_lr=0.0", "optim.warmup_iters=0", "optim.grad_clip=0.0",
                  f'precision.dtype="{precision}"', "train.max_iters=40", "checkpoint.every_iters=1",
                  "checkpoint.keep_last=3", "train.eval_interval=0", "train.log_interval=40")
    line = _one_line_error(proc, "training diverged")
    kept = checkpoint.listing(out)
    assert kept, proc.stderr
    for path in kept:  # every checkpoint on disk holds finite weights and optimizer state
        for name in ("model.pt", "optimizer.pt"):
            state = checkpoint.load(path, name)
            assert checkpoint.non_finite({name: state}) == [], (path, name)
    assert checkpoint.read_latest(out) == checkpoint.step_of(kept[-1]) and checkpoint.verify(kept[-1]) is None
    assert f"{kept[-1]} stays the newest checkpoint" in line
    # the run stopped at the first non-finite state: it never got past the checkpoint after the last good one
    assert records(out, "train") == [] or all(r["step"] <= checkpoint.step_of(kept[-1]) + 1 for r in records(out, "train"))
    check = hpclm("train", "--check", "--out", out, *_sets(shakespeare_dir, f'precision.dtype="{precision}"'))
    assert check.returncode == 0 and f"would resume from {kept[-1]}" in check.stdout, check.stderr


def test_a_missing_or_unusable_checkpoint_history_is_an_error_not_a_fresh_start(trained_run, shakespeare_dir, tmp_path):  # noqa: F811
    out = _copy_run(trained_run, tmp_path)
    for path in checkpoint.listing(out):  # the folders are gone, `latest` still names step 4
        shutil.rmtree(path)
    before = _snapshot(out)
    args = ("train.max_iters=6", "checkpoint.every_iters=2", "train.eval_interval=0")
    _one_line_error(_train(shakespeare_dir, out, *args), "names iteration 4, whose folder is gone", "--resume never --force")
    assert _snapshot(out) == before  # metrics.jsonl and the rest untouched
    check = hpclm("train", "--check", "--out", out, *_sets(shakespeare_dir, *args))
    _one_line_error(check, "whose folder is gone")
    # every checkpoint corrupt: the first start moves them aside and stops; the second start stops too
    out2 = _copy_run(trained_run, tmp_path / "b")
    for path in checkpoint.listing(out2):
        (path / "model.pt").write_bytes(b"garbage")
    metrics = (out2 / "metrics.jsonl").read_bytes()
    first = _train(shakespeare_dir, out2, *args)
    assert first.returncode == 2 and "none is complete" in first.stderr, first.stderr
    second = _train(shakespeare_dir, out2, *args)
    _one_line_error(second, "every checkpoint was found corrupt and moved aside")
    assert (out2 / "metrics.jsonl").read_bytes() == metrics
    forced = hpclm("train", "--out", out2, "--resume", "never", "--force", *_sets(shakespeare_dir, *args))
    assert forced.returncode == 0, forced.stderr  # what the error says to do works


def test_a_checkpoint_that_passes_its_hashes_but_holds_garbage_is_passed_over(trained_run, shakespeare_dir, tmp_path):  # noqa: F811
    cases = {
        "manifest_files_a_list": None,
        "manifest_files_empty": None,
        "model.pt": b"\x80\x04cos\nsystem\n(S'true'\ntR.",  # a pickle weights_only refuses
        "tokenizer.json": b"{not json",
        "config.toml": b"[model]\nn_layr = 2\n",
        "meta.json": json.dumps({"vocab_size": 10**12}).encode(),
    }
    for case, data in cases.items():
        out = _copy_run(trained_run, tmp_path / case)
        newest = checkpoint.root(out) / "iter_0000004"
        if case.startswith("manifest"):
            m = json.loads((newest / "manifest.json").read_text())
            m["files"] = list(m["files"]) if case.endswith("list") else {}
            (newest / "manifest.json").write_text(json.dumps(m))
        else:
            _tamper(newest, case, data)
        gen = hpclm("generate", "--ckpt", newest, "--max-new-tokens", "5")
        _one_line_error(gen, "iter_0000004 is incomplete or corrupt")
        proc = _train(shakespeare_dir, out, "train.max_iters=6", "checkpoint.every_iters=2", "train.eval_interval=0")
        assert proc.returncode == 0, (case, proc.stderr[-2000:])
        assert "iter_0000004 is incomplete or corrupt" in proc.stderr and "Traceback" not in proc.stderr, case
        assert "incomplete or corrupt" not in proc.stdout  # warnings go to stderr
        assert (checkpoint.root(out) / "iter_0000004.corrupt").is_dir()  # kept for inspection
        assert records(out, "train")[-1]["step"] == 6 and checkpoint.read_latest(out) == 6, case


# --- hangs --------------------------------------------------------------------------------------

def test_prepare_reads_only_regular_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("to be or not to be, that is the question\n" * 20)
    os.mkfifo(corpus / "pipe.txt")  # reading it would block forever
    proc = run_python(["-m", "hpclm", "prepare", str(corpus), "--out", str(tmp_path / "data")], timeout=60)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["source_files"] == 1
    fifo = run_python(["-m", "hpclm", "prepare", str(corpus / "pipe.txt"), "--out", str(tmp_path / "d2")], timeout=60)
    _one_line_error(fifo, "is not a regular file")


# --- one line, exit 2, instead of a traceback -----------------------------------------------------

BAD_TRAIN_SETTINGS = [
    ('train.device="cuda:abc"', "train.device must be"),
    ('train.device="cpu:abc"', "train.device must be"),
    ("train.seed=9223372036854775808", "train.seed must be in"),
    ("precision.init_scale=inf", "precision.init_scale must be a finite number"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
]


@pytest.mark.parametrize("setting,words", BAD_TRAIN_SETTINGS)
def test_bad_train_settings_are_one_line(shakespeare_dir, tmp_path, setting, words):  # noqa: F811
    out = tmp_path / "run"
    data_before = _snapshot(shakespeare_dir)
    for extra in ([], ["--check"]):
        proc = hpclm("train", *extra, "--out", out, *_sets(shakespeare_dir, setting))
        _one_line_error(proc, words)
    assert not out.exists() and _snapshot(shakespeare_dir) == data_before


@pytest.mark.parametrize("args,words", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--seed", "100000000000000000000"], "--seed must be in"),
    (["--seed", "1e20"], "invalid int value"),
    (["--prompt", "to be\udc80"], "--prompt is not valid text"),
])
def test_bad_generate_options_are_one_line(trained_run, args, words):
    before = _snapshot(trained_run)
    _one_line_error(hpclm("generate", "--ckpt", trained_run, *args), words)
    assert _snapshot(trained_run) == before


def test_a_tiny_temperature_samples_the_likeliest_tokens(trained_run):
    tiny = hpclm("generate", "--ckpt", trained_run, "--temperature", "1e-45", "--max-new-tokens", "40", "--seed", "1")
    greedy = hpclm("generate", "--ckpt", trained_run, "--top-k", "1", "--max-new-tokens", "40", "--seed", "2")
    assert tiny.returncode == 0 and greedy.returncode == 0, tiny.stderr + greedy.stderr
    assert tiny.stdout == greedy.stdout and len(tiny.stdout) > 40


def test_vocab_size_in_meta_must_match_the_tokenizer(shakespeare_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(shakespeare_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    for bad, words in ((1e12, "is not a whole number"), (10**12, "not a whole number"), (66, "but")):
        meta["vocab_size"] = bad
        (data / "meta.json").write_text(json.dumps(meta))
        _one_line_error(_train(data, tmp_path / "run"), "vocab", words)
        assert not (tmp_path / "run").exists()


def test_a_dataset_without_its_tokenizer_fails_check_and_start_alike(shakespeare_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(shakespeare_dir, data)
    (data / "tokenizer.json").unlink()
    for extra in (["--check"], []):
        proc = hpclm("train", *extra, "--out", tmp_path / "run", *_sets(data))
        _one_line_error(proc, "no tokenizer at")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def same_and_other_tokenizer(tmp_path_factory):
    """Two prepared datasets beside shakespeare-char: its lines in reverse order (the same 65 characters,
    so the same tokenizer, and another val split), and the text with 'z' turned into 'é' (as many
    characters, another tokenizer)."""
    from helpers.lm_fixtures import SHAKESPEARE
    root = tmp_path_factory.mktemp("tokenizers")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    dirs = []
    for name, variant in (("same", "\n".join(reversed(text.split("\n")))), ("other", text.replace("z", "é"))):
        (root / f"{name}.txt").write_text(variant, encoding="utf-8")
        assert hpclm("prepare", root / f"{name}.txt", "--out", root / name).returncode == 0
        dirs.append(root / name)
    return dirs


def _eval_line(proc):
    """(loss, tokens, val.bin path) from `hpclm eval`'s line."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("val loss"))
    words = line.split()
    return float(words[2].rstrip(",")), int(words[6].replace(",", "")), words[9]


def test_eval_data_scores_another_split_of_the_same_tokenizer_and_refuses_another(
        trained_run, shakespeare_dir, same_and_other_tokenizer):  # noqa: F811
    same, other = same_and_other_tokenizer
    own_loss, own_count, own_path = _eval_line(hpclm("eval", "--ckpt", trained_run))
    loss, count, path = _eval_line(hpclm("eval", "--ckpt", trained_run, "--data", same))
    val = len(np.fromfile(same / "val.bin", dtype=json.loads((same / "meta.json").read_text())["dtype"]))
    assert path == str(same / "val.bin") and own_path == str(shakespeare_dir / "val.bin")
    assert count == (val - 1) // 32 * 32 and loss != own_loss  # that split, every whole block of 32
    _one_line_error(hpclm("eval", "--ckpt", trained_run, "--data", other), "was tokenized with another tokenizer")


def test_eval_under_mpirun_shares_the_blocks_and_reports_the_one_rank_figures(trained_run):
    loss, count, _ = _eval_line(hpclm("eval", "--ckpt", trained_run))
    proc = mpirun(2, ["-m", "hpclm", "eval", "--ckpt", str(trained_run)])
    assert proc.stdout.count("val loss") == 1  # rank 0 alone prints
    loss2, count2, _ = _eval_line(proc)
    assert count2 == count and loss2 == pytest.approx(loss, rel=1e-5)  # each block once, summed over both ranks


def test_resuming_on_data_of_another_tokenizer_is_refused(trained_run, same_and_other_tokenizer, tmp_path):
    out = _copy_run(trained_run, tmp_path)
    before = _snapshot(out)
    proc = _train(same_and_other_tokenizer[1], out, "train.max_iters=6", "train.eval_interval=0")
    _one_line_error(proc, "holds checkpoints of a different model (the tokenizer differs from data.path's)")
    assert _snapshot(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_fails_check_and_start_alike(shakespeare_dir, tmp_path):  # noqa: F811
    for extra in (["--check"], []):
        proc = hpclm("train", *extra, "--out", tmp_path / "run", *_sets(shakespeare_dir, 'train.device="cuda"'))
        _one_line_error(proc, "torch sees no CUDA device")
    assert not (tmp_path / "run").exists()


def test_read_only_checkpoints_fail_at_start_not_at_the_first_checkpoint(trained_run, shakespeare_dir, tmp_path):  # noqa: F811
    out = _copy_run(trained_run, tmp_path)
    before = _snapshot(out)
    proc = run_with_read_only([checkpoint.root(out)], ["-m", "hpclm", "train", "--out", str(out),
                                                       *_sets(shakespeare_dir, "train.max_iters=8", "train.eval_interval=0",
                                                              "checkpoint.every_iters=8")])
    _one_line_error(proc, f"cannot write checkpoints to {checkpoint.root(out)}")
    assert "step 5/8" not in proc.stdout  # not one step trained, none lost
    assert _snapshot(out) == before


def test_prepare_into_a_read_only_place_is_one_line(tmp_path):
    (tmp_path / "t.txt").write_text("to be or not to be\n" * 50)
    parent = tmp_path / "ro"
    parent.mkdir()
    proc = run_with_read_only([parent], ["-m", "hpclm", "prepare", str(tmp_path / "t.txt"), "--out",
                                         str(parent / "data")])
    _one_line_error(proc, "cannot write --out")
    assert list(parent.iterdir()) == []


def test_prepare_force_over_a_read_only_dataset_keeps_it_whole(tmp_path):
    (tmp_path / "a.txt").write_text("to be or not to be\n" * 50)
    (tmp_path / "b.txt").write_text("all that glitters is not gold\n" * 50)
    data = tmp_path / "data"
    assert hpclm("prepare", tmp_path / "a.txt", "--out", data).returncode == 0
    before = _snapshot(data)
    proc = run_with_read_only([data], ["-m", "hpclm", "prepare", str(tmp_path / "b.txt"), "--out", str(data), "--force"])
    _one_line_error(proc, "cannot write --out")
    assert _snapshot(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "data"]  # no .data.tmp-/.data.old- left


def test_an_infinite_loss_scale_and_a_run_that_skips_every_step(shakespeare_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    proc = _train(shakespeare_dir, out, 'precision.dtype="fp16"', "precision.init_scale=1e30", "train.max_iters=4",
                  "train.eval_interval=0", "checkpoint.every_iters=0")
    _one_line_error(proc, "every one of the 4 steps of this run was skipped")
    assert "done: step" not in proc.stdout


def test_overflows_persisting_at_the_minimum_scale_stop_with_the_last_checkpoint_as_it_was(shakespeare_dir, tmp_path):  # noqa: F811
    """A scale fp16 cannot hold (1e30, also the minimum) overflows every step: after max_consecutive_skips of
    them the run stops with one line, and no checkpoint is written for the failing step."""
    out = tmp_path / "run"
    proc = _train(shakespeare_dir, out, 'precision.dtype="fp16"', "precision.init_scale=1e30", "precision.min_scale=1e30",
                  "precision.max_consecutive_skips=3", "train.max_iters=20", "train.eval_interval=0",
                  "checkpoint.every_iters=1")
    _one_line_error(proc, "overflowed for 3 consecutive steps at the minimum loss scale 1e+30")
    assert checkpoint.read_latest(out) == 2 and sorted(p.name for p in checkpoint.root(out).iterdir()) == [
        "iter_0000001", "iter_0000002", "latest"]  # steps 1 and 2 skipped and saved; step 3 stopped the run
    state = checkpoint.load(checkpoint.resolve(out), "state.pt")  # the last checkpoint verifies
    assert state["loss_scaler"]["consecutive_skips_at_min"] == 2 and state["loss_scaler"]["skipped_steps"] == 2


def test_a_busy_prometheus_port_writes_nothing(shakespeare_dir, tmp_path):  # noqa: F811
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = tmp_path / "run"
        _one_line_error(_train(shakespeare_dir, out, f"metrics.prometheus_port={port}"), f"127.0.0.1:{port}")
        assert not (out / "config.toml").exists() and not (out / "metrics.jsonl").exists()


# --- the probe and the benchmarks -------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["-f", "nan"], "-f nan must be greater than 1 (and finite)"),
    (["-b", "1000G", "-e", "1000G"], "use a smaller -e"),
    (["--json", "/etc/hostname/probe.json"], "--json /etc/hostname/probe.json"),
    (["--plot", "/etc/hostname/probe.png"], "--plot /etc/hostname/probe.png"),
])
def test_bad_probe_options_are_one_line_from_rank_0(args, words):
    t0 = time.time()
    proc = mpirun(2, ["-m", "hpclm", "probe", "allreduce", "-b", "1K", "-e", "4K", "-n", "1", "-w", "0",
                      "--impl", "ring", *args], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hpclm")]  # mpirun adds its own banner
    assert len(ours) == 1 and ours[0].startswith("hpclm probe: error:") and words in ours[0], proc.stderr
    assert "size" not in proc.stdout and time.time() - t0 < 100  # checked before any measurement


def test_benchmark_outputs_are_checked_before_the_run():
    proc = hpclm("bench", "softmax", "--shapes", "1x8x8", "--json", "/etc/hostname/x.json")
    _one_line_error(proc, "--json /etc/hostname/x.json")
    assert "cpu " not in proc.stdout  # no case measured first


# --- small things -------------------------------------------------------------------------------

def test_a_checkpoint_write_that_fails_leaves_no_temporary_folder(trained_run, shakespeare_dir, tmp_path):  # noqa: F811
    """A disk that fills up mid-checkpoint: one line, the old checkpoints whole, no .tmp- folder left."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a small private file system")
    out = _copy_run(trained_run, tmp_path)
    ckpts = checkpoint.root(out)
    keep = tmp_path / "keep"
    shutil.copytree(ckpts, keep)
    size_kb = sum(p.stat().st_size for p in ckpts.rglob("*") if p.is_file()) // 1024 + 64  # room for little more
    train = shlex.join([sys.executable, "-m", "hpclm", "train", "--out", str(out),
                        *_sets(shakespeare_dir, "train.max_iters=6", "train.eval_interval=0", "checkpoint.every_iters=6")])
    script = (f"mount -t tmpfs -o size={size_kb}k none {ckpts} && cp -a {keep}/. {ckpts}/ && {train}; "
              f"echo rc=$?; echo LISTING; ls -a {ckpts}; cat {ckpts}/latest")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=hang_guard(240))
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    _one_line_error(subprocess.CompletedProcess([], 2, "", proc.stderr), "cannot write checkpoint iter_0000006")
    listing = proc.stdout.split("LISTING", 1)[1].split()
    assert not any(name.startswith(".tmp-") for name in listing), listing  # the failed write cleaned up
    assert "iter_0000004" in listing and listing[-1] == "4"  # the earlier checkpoint whole, `latest` on it


def _scrape(url: str) -> dict[str, float]:
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    return {name: float(value) for name, value in
            (line.split() for line in body.splitlines() if line.startswith("hpclm_"))}


def test_two_ranks_under_mpirun_serve_the_latest_record_and_stop_on_sigusr1(shakespeare_dir, tmp_path):  # noqa: F811
    """Rank 0 alone serves Prometheus (a second server on the port would fail the run) with the figures of
    a record in metrics.jsonl; SIGUSR1 to mpirun reaches the ranks, which checkpoint and exit 75.
    (A SIGTERM to mpirun ends in mpirun's own exit code: README says what a script checks then.)"""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found")
    for attempt in range(3):  # the free port found here may be taken before the run binds it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / f"run{attempt}"
        cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "--allow-run-as-root", sys.executable,
               "-m", "hpclm", "train", "--out", str(out),
               *_sets(shakespeare_dir, "train.max_iters=100000", "train.eval_interval=0", "checkpoint.every_iters=0",
                      f"metrics.prometheus_port={port}")]
        proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + hang_guard(120)
        while time.time() < deadline and proc.poll() is None and not records(out, "train"):
            time.sleep(0.1)
        if proc.poll() is not None:
            _, err = proc.communicate()
            if "cannot serve Prometheus metrics" in err:
                continue
            pytest.fail(f"training ended before its first record: {err[-2000:]}")
        break
    assert records(out, "train"), "no train record within 120 s"
    try:
        served = _scrape(f"http://127.0.0.1:{port}/metrics")
        logged = {r["step"]: r for r in records(out, "train")}  # read after the scrape: holds the record served
        step = int(served["hpclm_step"])
        assert step in logged and served["hpclm_ranks"] == 2
        for key in ("loss", "tokens", "tokens_per_s", "grad_norm", "lr"):
            assert served[f"hpclm_{key}"] == logged[step][key], key  # one record's figures, not a mix
        later = served
        while later["hpclm_step"] == step and time.time() < deadline:
            later = _scrape(f"http://127.0.0.1:{port}/metrics")
        assert later["hpclm_step"] > step  # the latest record, not the first
    finally:
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=hang_guard(120))
    assert proc.returncode == 75, err[-2000:]
    assert (out / "preempted").is_file() and checkpoint.read_latest(out) == int((out / "preempted").read_text())
