"""Data parallelism over Horovod/MPI and FP16 loss scaling, under real mpirun -np 2."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import child_env, descendants, hang_guard, mpirun, requires_horovod, run_python
from helpers.lm_fixtures import TINY, records, shakespeare_dir  # noqa: F401 (fixture)

pytestmark = requires_horovod

# Drives the trainer's own pieces (setup, forward_backward, apply_update) with batches the test
# chooses, so one rank with 2B sequences and two ranks with B each see the same samples.
STEPS = textwrap.dedent("""
    import json, sys, numpy as np, torch
    import hpclm.dist as dist
    from hpclm import config
    from hpclm.train import loop, train
    from hpclm.data import get_batch
    out, mode, *overrides = sys.argv[1:]
    cfg = config.load(None, overrides)
    run = loop.setup(cfg, __import__("pathlib").Path(out), "never", False, lambda *a: None)
    amp = loop.autocast(cfg.precision, run.device)
    r, n, B, T = dist.rank(), dist.size(), cfg.train.batch_size, cfg.data.block_size
    report = {"rank": r, "steps": []}
    for step in range(6):
        G = 2 * B if mode == "average" else B
        x, y = get_batch(run.data.train, G, T, np.random.default_rng(1000 + step + (r if mode == "inject" else 0)),
                         run.device)
        if mode == "average":  # rank r takes its share of the same global batch, in grad_accum micro-batches
            x, y = x[r * G // n:(r + 1) * G // n], y[r * G // n:(r + 1) * G // n]
            k = cfg.train.grad_accum
            batches = [(x[i * len(x) // k:(i + 1) * len(x) // k], y[i * len(y) // k:(i + 1) * len(y) // k]) for i in range(k)]
        else:
            batches = [(x, y)]
        hook = None
        if mode == "inject" and r == 1 and step in (2, 3):  # a non-finite gradient on rank 1 only
            hook = run.params[0].register_hook(lambda g: g * float("inf"))
        before = [p.detach().clone() for p in run.params]
        result = loop.apply_update(run, loop.forward_backward(run, batches, amp))
        applied = result.applied
        if hook:
            hook.remove()
        report["steps"].append({"applied": applied, "scale": run.scaler.scale, "lr_step": run.lr_step,
                                "skipped": run.scaler.skipped_steps,
                                "moved": any(not torch.equal(a, p) for a, p in zip(before, run.params))})
    report["params"] = [p.detach().double().flatten().tolist() for p in run.params]
    with open(f"{out}.rank{r}.json", "w") as f:
        json.dump(report, f)
""")


def _cfg(data_dir, *extra):
    return [f"data.path={json.dumps(str(data_dir))}", *TINY, "model.dropout=0.0", *extra]


def _reports(out, n):
    return [json.loads(open(f"{out}.rank{r}.json").read()) for r in range(n)]


def test_two_ranks_batch_b_equal_one_rank_batch_2b(shakespeare_dir, tmp_path):
    one = run_python(["-c", STEPS, str(tmp_path / "one"), "average", *_cfg(shakespeare_dir, "train.grad_accum=1")])
    assert one.returncode == 0, one.stderr
    two = mpirun(2, ["-c", STEPS, str(tmp_path / "two"), "average", *_cfg(shakespeare_dir, "train.grad_accum=2")])
    assert two.returncode == 0, two.stdout + two.stderr
    (ref,), pair = _reports(tmp_path / "one", 1), _reports(tmp_path / "two", 2)
    assert pair[0]["params"] == pair[1]["params"]  # replicas identical
    worst = max(abs(a - b) for p, q in zip(ref["params"], pair[0]["params"]) for a, b in zip(p, q))
    assert worst < 1e-5, f"2 ranks x B differ from 1 rank x 2B by {worst}"
    assert all(s["moved"] for s in ref["steps"])  # the comparison is not between untrained models

    # the same with gradients allreduced in fp16: rounded on the wire, so close to the fp32 pair but not equal
    fp16 = mpirun(2, ["-c", STEPS, str(tmp_path / "fp16"), "average",
                      *_cfg(shakespeare_dir, "train.grad_accum=2", "dist.fp16_compression=true")])
    assert fp16.returncode == 0, fp16.stdout + fp16.stderr
    wire = _reports(tmp_path / "fp16", 2)
    assert wire[0]["params"] == wire[1]["params"]
    off = max(abs(a - b) for p, q in zip(pair[0]["params"], wire[0]["params"]) for a, b in zip(p, q))
    assert 0 < off < 1e-3, f"fp16 compression moved the weights by {off}"


START = textwrap.dedent("""
    import json, sys, torch
    import hpclm.dist as dist
    from hpclm import config
    from hpclm.train import loop
    out, *overrides = sys.argv[1:]
    real_build = loop.build_model
    def build(cfg, vocab_size):  # every rank starts from other weights: the start must give them rank 0's
        model = real_build(cfg, vocab_size)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (dist.rank() + 1))
        return model
    loop.build_model = build
    run = loop.setup(config.load(None, overrides), __import__("pathlib").Path(out), "never", False, lambda *a: None)
    with open(f"{out}.rank{dist.rank()}.json", "w") as f:
        json.dump([p.detach().double().flatten().tolist() for p in run.params], f)
""")


def test_every_rank_starts_from_rank_0s_weights(shakespeare_dir, tmp_path):
    one = run_python(["-c", START, str(tmp_path / "one"), *_cfg(shakespeare_dir)])
    assert one.returncode == 0, one.stderr
    two = mpirun(2, ["-c", START, str(tmp_path / "two"), *_cfg(shakespeare_dir)])
    assert two.returncode == 0, two.stdout + two.stderr
    ref = json.loads(open(f"{tmp_path / 'one'}.rank0.json").read())
    ranks = [json.loads(open(f"{tmp_path / 'two'}.rank{r}.json").read()) for r in range(2)]
    assert ranks[0] == ranks[1] == ref  # rank 1's own weights were replaced by rank 0's


def test_injected_overflow_on_one_rank_is_skipped_by_both(shakespeare_dir, tmp_path):
    cfg = _cfg(shakespeare_dir, "precision.dtype=fp16", "precision.init_scale=1024", "precision.hysteresis=2")
    proc = mpirun(2, ["-c", STEPS, str(tmp_path / "fp16"), "inject", *cfg])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = _reports(tmp_path / "fp16", 2)
    for rep in reports:
        steps = rep["steps"]
        assert [s["applied"] for s in steps] == [True, True, False, False, True, True]
        assert [s["moved"] for s in steps] == [True, True, False, False, True, True]
        assert [s["scale"] for s in steps] == [1024, 1024, 1024, 512, 512, 512]  # backs off at the 2nd overflow
        assert [s["lr_step"] for s in steps] == [1, 2, 2, 2, 3, 4]  # skipped steps do not advance the LR
        assert steps[-1]["skipped"] == 2
    assert reports[0]["params"] == reports[1]["params"]


def test_fp16_ends_close_to_fp32(shakespeare_dir, tmp_path):
    script = textwrap.dedent("""
        import json, sys, torch
        from hpclm import config
        from hpclm.train import loop, train
        out, *overrides = sys.argv[1:]
        losses, dtypes, real_setup = {}, {}, loop.setup
        def setup(*a, **k):  # record what dtype the model's matmuls really produce while training
            run = real_setup(*a, **k)
            for m in run.model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_hook(lambda mod, inp, outp: seen.add(str(outp.dtype)) if mod.training else None)
            return run
        loop.setup = setup
        for dtype in ("fp32", "fp16"):
            seen = set()
            cfg = config.load(None, [*overrides, f"precision.dtype={dtype}"])
            s = train(cfg, f"{out}/{dtype}", progress_bar=False)
            losses[dtype], dtypes[dtype] = s["val_loss"], sorted(seen)
        print(json.dumps({"losses": losses, "dtypes": dtypes}))
    """)
    cfg = _cfg(shakespeare_dir, "model.n_embd=64", "model.n_layer=2", "train.max_iters=200", "train.eval_interval=0",
               "train.eval_iters=20", "train.log_interval=50", "checkpoint.every_iters=0", "train.batch_size=8")
    proc = run_python(["-c", script, str(tmp_path), *cfg], timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    losses = result["losses"]
    # fp16 training really ran its matmuls in float16 (a no-op autocast would pass the loss checks below)
    assert result["dtypes"] == {"fp32": ["torch.float32"], "fp16": ["torch.float16"]}
    assert losses["fp32"] < 2.7  # it learned something (ln 65 = 4.17 untrained)
    assert abs(losses["fp16"] - losses["fp32"]) < 0.05, losses
    assert max(r["loss_scale"] for r in records(tmp_path / "fp16", "train")) >= 2.0**16


def _train_cmd(out, data_dir, *extra):
    return ["-m", "hpclm", "train", "--out", str(out), *[f"--set={o}" for o in _cfg(data_dir, *extra)]]


def _popen_mpirun(args):
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "--allow-run-as-root", sys.executable, *args]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_job(proc):
    """SIGKILL mpirun and every rank: Open MPI puts ranks in process groups of their own, so
    killing mpirun's group alone would leave them running as orphans."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _running(pid) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, timeout, what):
    deadline = time.time() + hang_guard(timeout)
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_two_rank_run_resumes_to_the_same_losses(shakespeare_dir, tmp_path):
    """The killed run has no end (max_iters 100000; the LR schedule is fixed at 150 steps for all three
    runs), so it cannot finish before the kill, and it is frozen (SIGSTOP) the moment its first checkpoint
    is seen."""
    extra = ("optim.lr_decay_iters=150", "checkpoint.every_iters=20", "model.dropout=0.1", "train.eval_interval=50")
    whole = mpirun(2, _train_cmd(tmp_path / "whole", shakespeare_dir, *extra, "train.max_iters=150"))
    assert whole.returncode == 0, whole.stdout + whole.stderr

    out = tmp_path / "killed"
    proc = _popen_mpirun(_train_cmd(out, shakespeare_dir, *extra, "train.max_iters=100000"))
    _wait_for(lambda: (out / "checkpoints" / "latest").is_file(), 120, "a first checkpoint")
    ranks = descendants(proc.pid)
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    _kill_job(proc)
    proc.communicate(timeout=hang_guard(30))
    _wait_for(lambda: not any(_running(p) for p in ranks), 30, "the killed ranks to be gone")
    killed_at = int((out / "checkpoints" / "latest").read_text().split("_")[-1].strip() or 0)
    assert killed_at < 150, "the run went past the reference's end before it was frozen: the test proves nothing"

    resumed = mpirun(2, _train_cmd(out, shakespeare_dir, *extra, "train.max_iters=150"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    a = {r["step"]: r["loss"] for r in records(tmp_path / "whole", "train")}
    b = {r["step"]: r["loss"] for r in records(out, "train")}
    assert sorted(a) == sorted(b) == list(range(1, 151))
    assert a == b  # exact: same batches, same dropout RNG, same averaging
    assert [r["val_loss"] for r in records(out, "eval")] == [r["val_loss"] for r in records(tmp_path / "whole", "eval")]


def test_killing_one_rank_ends_the_job_quickly(shakespeare_dir, tmp_path):
    out = tmp_path / "run"
    proc = _popen_mpirun(_train_cmd(out, shakespeare_dir, "train.max_iters=100000", "checkpoint.every_iters=0"))
    try:
        _wait_for(lambda: records(out, "train") if (out / "metrics.jsonl").is_file() else False, 120, "training to start")
        ranks = [c for c in descendants(proc.pid) if "python" in open(f"/proc/{c}/cmdline").read()]
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        try:  # a run of 100000 steps: only mpirun's reaction to the lost rank ends it in this time
            proc.communicate(timeout=hang_guard(120))
        except subprocess.TimeoutExpired:
            pytest.fail("the job still runs 120 s after one of its ranks was killed")
        _wait_for(lambda: not _running(ranks[0]), 30, "mpirun to end rank 0 too")  # it may exit first
    finally:
        _kill_job(proc)
    assert proc.returncode != 0
    assert records(out, "train")[-1]["step"] < 100000


# Logs, per rank, the order of the trainer's collectives: any_rank is an MPI call beside Horovod, and a rank
# that exits while another is still inside it has Horovod's shutdown finalize MPI under that rank (exit 139).
CALL_ORDER = textwrap.dedent("""
    import json, os, signal, sys
    import hpclm.dist as dist
    from hpclm import config
    from hpclm.train import loop, train
    from hpclm.errors import Preempted
    out, stop_at, *overrides = sys.argv[1:]
    calls = []
    def logged(name, fn):
        def call(*a, **k):
            result = fn(*a, **k)
            calls.append(name)
            if name == "synchronize_gradients" and calls.count(name) == int(stop_at) and dist.rank() == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # one rank is told to stop
            return result
        return call
    for name in ("any_rank", "barrier", "allreduce", "broadcast_object", "synchronize_gradients"):
        setattr(dist, name, logged(name, getattr(dist, name)))
    try:
        train(config.load(None, overrides), out, progress_bar=False)
        ended = "done"
    except Preempted:
        ended = "preempted"
    with open(f"{out}.rank{dist.rank()}.json", "w") as f:
        json.dump({"ended": ended, "calls": calls}, f)
""")


# 0: run to the end; 3: SIGUSR1 on rank 1 during step 3, right after which a checkpoint is due anyway
@pytest.mark.parametrize("stop_at", [0, 3])
def test_no_rank_can_exit_while_another_is_inside_any_rank(shakespeare_dir, tmp_path, stop_at):
    out = tmp_path / "run"
    proc = mpirun(2, ["-c", CALL_ORDER, str(out), str(stop_at),
                      *_cfg(shakespeare_dir, "train.max_iters=6", "train.eval_interval=0", "checkpoint.every_iters=3")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ranks = _reports(out, 2)
    assert [r["ended"] for r in ranks] == ["preempted" if stop_at else "done"] * 2
    for r in ranks:
        calls = r["calls"]
        last = len(calls) - 1 - calls[::-1].index("any_rank")
        # a Horovod collective after the last any_rank: it completes on no rank before every rank has left any_rank
        assert set(calls[last + 1:]) & {"barrier", "allreduce", "broadcast_object", "synchronize_gradients"}, calls
        assert calls.count("any_rank") == (stop_at if stop_at else 5)  # never after the last step
