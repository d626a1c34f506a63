"""Tensor parallelism (hpclm.parallel) under real mpirun: the collectives of both backends, the split GPT
against the T=1 GPT built with the same seed, and the [parallel] layout checks."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, child_env, descendants, hang_guard, mpirun, run_python
from helpers.lm_fixtures import records, shakespeare_dir  # noqa: F401 (fixture)
from hpclm.parallel.gpt import shard_spec, shard_tensor, unshard_tensor
from hpclm.parallel.groups import Layout
from hpclm.parallel.layers import padded_vocab


@pytest.fixture(scope="module", params=[(2, 2, "mpi"), (2, 2, "torch"), (4, 2, "mpi"), (4, 4, "mpi")],
                ids=lambda p: f"np{p[0]}-tp{p[1]}-{p[2]}")
def tp_run(request, tmp_path_factory):
    """tests/helpers/tp_cases.py under mpirun -np N with tensor = T over one backend; each rank's findings."""
    n, tensor, backend = request.param
    out = tmp_path_factory.mktemp(f"tp{n}{tensor}{backend}")
    proc = mpirun(n, [str(REPO / "tests" / "helpers" / "tp_cases.py"), str(out), str(tensor), backend],
                  env={"MASTER_ADDR": "127.0.0.1"}, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    for r in rows:
        assert "crash" not in r, r["crash"]
    return n, tensor, backend, rows


def test_every_check_passes_on_every_rank(tp_run):
    """Collectives vs MPI_Allreduce (same bits on every TP rank); shards = slices of the T=1 model; loss,
    generation logits and every gradient = T=1 within 1e-10 (float64), vocabularies 65 / 64 / 21 (padded);
    30 AdamW steps within 1e-4 of T=1, replicated parameters bit-identical across the TP group."""
    n, tensor, backend, rows = tp_run
    for r in rows:
        assert r["failures"] == [], r["failures"][:5]
        assert r["checked"] >= 200
        assert r["group"] == [backend, tensor, r["rank"] % tensor]
        assert r["collective_calls"] > 100  # the TP model really communicated
        if backend == "mpi":  # one node: the group's own shared memory; the other paths were checked too
            assert r["transport"] == "shared memory", r["transport"]
            assert r["transport_without_shm"] == "MPI (shared memory turned off)"


def test_data_replicas_see_the_same_numbers(tp_run):
    """Every TP group trains on the same samples here, so every rank's losses agree exactly."""
    n, tensor, backend, rows = tp_run
    assert all(r["tp_losses"] == rows[0]["tp_losses"] for r in rows)
    assert len(rows[0]["tp_losses"]) == 30


def test_layout_puts_consecutive_ranks_in_a_tp_group():
    layouts = [Layout(8, 2, r) for r in range(8)]
    assert [l.tp_rank for l in layouts] == [0, 1] * 4 and [l.dp_rank for l in layouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert layouts[5].tp_ranks == [4, 5] and layouts[0].data == 4
    assert Layout(8, 2, 0).describe() == ("8 rank(s) = 4 data replica(s) x 2 tensor-parallel; "
                                          "TP groups [0,1], [2,3], [4,5], [6,7]")
    within = Layout(4, 2, 0).describe(["a", "a", "b", "b"])
    assert within.endswith("TP groups [0,1] on a, [2,3] on b") and "warning" not in within
    across = Layout(4, 2, 0).describe(["a", "b", "a", "b"])  # round-robin placement: every group spans hosts
    assert "warning: TP group(s) [0,1] on a+b, [2,3] on a+b span hosts" in across


def test_shard_and_unshard_are_inverse_with_padding():
    full = {"transformer.wte.weight": torch.randn(65, 8), "transformer.h.0.attn.c_attn.weight": torch.randn(24, 8),
            "transformer.h.0.attn.c_attn.bias": torch.randn(24), "transformer.h.0.mlp.c_proj.weight": torch.randn(8, 32),
            "transformer.h.0.ln_1.weight": torch.randn(8)}
    for tensor in (1, 2, 4):
        for name, t in full.items():
            pieces = [shard_tensor(name, t, tensor, r) for r in range(tensor)]
            assert torch.equal(unshard_tensor(name, pieces, 65), t), (name, tensor)
    # q, k, v are split by heads: rank 0 of 2 holds the first half of each of the three blocks
    qkv = full["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(shard_tensor("transformer.h.0.attn.c_attn.weight", qkv, 2, 0),
                       torch.cat([qkv[0:4], qkv[8:12], qkv[16:20]]))
    assert shard_tensor("transformer.wte.weight", full["transformer.wte.weight"], 2, 1).shape == (33, 8)
    assert padded_vocab(65, 2) == 66 and padded_vocab(64, 4) == 64
    assert shard_spec("transformer.h.3.attn.c_proj.bias") is None  # added after the reduce: replicated


@pytest.mark.parametrize("settings, message", [
    (["parallel.tensor=2", "model.arch=gru"], "model.arch 'gru' trains with parallel.tensor = 1"),
    (["parallel.tensor=3", "model.n_head=4"], "model.n_head (4) must be a multiple of parallel.tensor (3)"),
    (["parallel.tensor=0"], "parallel.tensor must be >= 1"),
    (["parallel.backend=nccl"], "parallel.backend (from --set) must be one of auto, mpi, torch"),
    (["parallel.tensor=2", "init.from=nanogpt:/nowhere/ckpt.pt"], "init.from with parallel.tensor = 2 is not supported"),
])
def test_bad_layouts_stop_with_one_line_and_write_nothing(tmp_path, settings, message):
    out = tmp_path / "run"
    args = ["-m", "hpclm", "train", "--out", str(out)]
    for s in settings:
        args += ["--set", s]
    proc = run_python(args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr
    assert not out.exists()


def test_world_not_divisible_by_tensor_is_one_error():
    from hpclm.comm import dist
    proc = mpirun(3, ["-c", "from hpclm.comm import dist\ntry:\n dist.init(tensor_parallel=2)\nexcept dist.DistError "
                             "as e:\n print('ERR', e)"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("ERR")]
    assert len(lines) == 3 and all("parallel.tensor = 2 does not divide the 3 rank(s)" in l for l in lines), proc.stdout
    assert dist.data_process_sets(6, 2) == [[0, 2, 4], [1, 3, 5]]


# --- hpclm train under tensor parallelism ----------------------------------------------------------

TRAIN = ["model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.bias=true", "model.dropout=0.0",
         "data.block_size=32", "train.batch_size=4", "train.eval_iters=2", "train.log_interval=1",
         "train.eval_interval=0", "optim.warmup_iters=5", "optim.lr=3e-3", "optim.lr_decay_iters=30"]


def _train_args(out, data_dir, *extra):
    return ["-m", "hpclm", "train", "--out", str(out),
            *[f"--set={o}" for o in [f"data.path={json.dumps(str(data_dir))}", *TRAIN, *extra]]]


def _train(ranks, out, data_dir, *extra):
    args = _train_args(out, data_dir, *extra)
    proc = mpirun(ranks, args, env={"MASTER_ADDR": "127.0.0.1"}) if ranks > 1 else run_python(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(out):
    return {r["step"]: r["loss"] for r in records(out, "train")}


def _close(a, b, tol=1e-4):
    return sorted(a) == sorted(b) and max(abs(a[k] - b[k]) for k in a) <= tol


@pytest.fixture(scope="module")
def reference(shakespeare_dir, tmp_path_factory):
    """30 steps of the T=1 run on one rank: the losses every layout below must reproduce."""
    out = tmp_path_factory.mktemp("tp-ref") / "run"
    _train(1, out, shakespeare_dir, "train.max_iters=30")
    return out


def test_thirty_steps_at_t2_equal_t1_and_save_full_tensors(shakespeare_dir, reference, tmp_path):
    proc = _train(2, tmp_path / "t2", shakespeare_dir, "train.max_iters=30", "parallel.tensor=2")
    assert f"layout 2 rank(s) = 1 data replica(s) x 2 tensor-parallel; TP groups [0,1] on {socket.gethostname()}; " \
        "TP collectives over mpi" in proc.stdout
    mine, ref = _losses(tmp_path / "t2"), _losses(reference)
    assert len(ref) == 30 and _close(mine, ref), (mine, ref)
    assert all(r["tp_collective_s"] > 0 for r in records(tmp_path / "t2", "train"))
    # the checkpoint holds the full model (vocabulary 65: no padding row), equal to the T=1 run's
    from hpclm.train import checkpoint
    a = checkpoint.load_weights(tmp_path / "t2" / "checkpoints" / "iter_0000030", "cpu")
    b = checkpoint.load_weights(reference / "checkpoints" / "iter_0000030", "cpu")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    state = checkpoint.load(tmp_path / "t2" / "checkpoints" / "iter_0000030", "state.pt")
    assert (state["tensor_parallel"], state["data_parallel"], state["world_size"]) == (2, 1, 2)
    # generate and eval read it as any checkpoint: the T=1 run's val loss and greedy text
    evals = [run_python(["-m", "hpclm", "eval", "--ckpt", str(d)]) for d in (tmp_path / "t2", reference)]
    assert all(e.returncode == 0 for e in evals), evals[0].stderr
    val = [float(re.search(r"val loss ([0-9.]+)", e.stdout).group(1)) for e in evals]
    assert abs(val[0] - val[1]) <= 1e-3, [e.stdout for e in evals]
    texts = [run_python(["-m", "hpclm", "generate", "--ckpt", str(d), "--max-new-tokens", "40", "--temperature", "0",
                         "--prompt", "ROMEO:"]) for d in (tmp_path / "t2", reference)]
    assert all(t.returncode == 0 for t in texts) and texts[0].stdout.startswith("ROMEO:"), texts[0].stderr
    assert texts[0].stdout == texts[1].stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_at_t2_follows_t1(shakespeare_dir, tmp_path, precision):
    """Autocast splits the matmuls' rounding differently, so the curves agree to half precision; fp16's loss
    scale (its overflow flag agreed over all ranks) follows the same sequence."""
    _train(1, tmp_path / "t1", shakespeare_dir, "train.max_iters=20", f"precision.dtype={precision}")
    _train(2, tmp_path / "t2", shakespeare_dir, "train.max_iters=20", f"precision.dtype={precision}",
           "parallel.tensor=2")
    assert _close(_losses(tmp_path / "t2"), _losses(tmp_path / "t1"), tol=5e-3)
    scales = [[r["loss_scale"] for r in records(tmp_path / d, "train")] for d in ("t1", "t2")]
    assert scales[0] == scales[1]


def test_four_ranks_d2_t2_equal_d2_t1(shakespeare_dir, tmp_path):
    _train(2, tmp_path / "d2t1", shakespeare_dir, "train.max_iters=30")
    proc = _train(4, tmp_path / "d2t2", shakespeare_dir, "train.max_iters=30", "parallel.tensor=2")
    assert (f"4 rank(s) = 2 data replica(s) x 2 tensor-parallel; TP groups [0,1] on {socket.gethostname()}, "
            f"[2,3] on {socket.gethostname()}") in proc.stdout
    assert "global batch 8 = 4 per replica x 2 data replica(s)" in proc.stdout
    assert _close(_losses(tmp_path / "d2t2"), _losses(tmp_path / "d2t1"))


def test_a_t2_checkpoint_resumes_at_t1_and_at_t2(shakespeare_dir, reference, tmp_path):
    """The batch sequence is the same in every layout with one data replica, so the resumed losses equal
    the uninterrupted run's (within float rounding of the split sums)."""
    first = tmp_path / "t2-first-half"
    _train(2, first, shakespeare_dir, "train.max_iters=15", "parallel.tensor=2")
    ref = _losses(reference)
    for ranks, tensor in ((1, 1), (2, 2)):
        out = tmp_path / f"resumed-t{tensor}"
        shutil.copytree(first, out)
        proc = _train(ranks, out, shakespeare_dir, "train.max_iters=30", f"parallel.tensor={tensor}")
        assert "resumed from" in proc.stdout and "iter_0000015" in proc.stdout
        resumed = {k: v for k, v in _losses(out).items() if k > 15}
        assert sorted(resumed) == list(range(16, 31))
        assert _close(resumed, {k: ref[k] for k in resumed}), (tensor, resumed)


def _world_rank(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    return int(env[b"OMPI_COMM_WORLD_RANK"]) if b"OMPI_COMM_WORLD_RANK" in env else None


def test_killing_one_rank_of_a_tp_group_ends_the_job(shakespeare_dir, tmp_path):
    out = tmp_path / "run"
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "--allow-run-as-root", sys.executable,
           *_train_args(out, shakespeare_dir, "train.max_iters=100000", "parallel.tensor=2")]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + hang_guard(120)
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and records(out, "train")):
            time.sleep(0.05)
        assert records(out, "train"), "the run never logged a step"
        victim = next(p for p in descendants(proc.pid) if _world_rank(p) == 1)
        killed = time.time()
        os.kill(victim, signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode != 0 and time.time() - killed < 60
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()


def test_a_launcher_that_gives_no_rank_count_is_refused_under_tp():
    """PMIx alone says a rank but not how many: the layout cannot be checked or set up, so it stops at start."""
    proc = run_python(["-c", "from hpclm.comm import dist\ntry:\n dist.init(tensor_parallel=2)\nexcept dist.DistError "
                             "as e:\n print('ERR', e)"], env={"PMIX_RANK": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "ERR parallel.tensor = 2 needs the number of ranks before start, and pmix does not say it" in proc.stdout
