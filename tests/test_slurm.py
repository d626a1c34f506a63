"""Real Slurm: jobs submitted with sbatch to a single-node cluster this test module starts and stops."""
import json
import sys
import time
import tempfile
from pathlib import Path

import pytest

from conftest import hang_guard, REPO, child_env, mpirun, requires_horovod
from helpers.lm_fixtures import TINY, records, shakespeare_dir  # noqa: F401 (fixture)
from helpers.slurm_cluster import LocalSlurm, missing_tools
from hpclm.train import checkpoint

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"Slurm/munge not installed ({', '.join(missing_tools())}); "
                                                               "scripts/setup.sh installs them where no Slurm exists")


@pytest.fixture(scope="module")
def slurm():
    # munged needs o+x on every directory above its socket: pytest's tmp dirs are 0700
    cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix="hpclm-slurm-")))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def job_env(**extra):
    env = child_env(extra)
    env["OMP_NUM_THREADS"] = "1"
    return env


def submit(slurm, script_text, tmp_path, *sbatch_args, env=None):
    script = tmp_path / "job.sh"
    script.write_text(script_text)
    out = tmp_path / "slurm-%j.out"
    job_id = slurm.sbatch("-o", str(out), *sbatch_args, str(script), cwd=REPO, env=env or job_env())
    return job_id, Path(str(out).replace("%j", str(job_id)))


@requires_horovod
def test_dist_under_srun_and_mpirun_in_a_batch_job(slurm, tmp_path):
    job_id, out = submit(slurm, "#!/bin/bash\n#SBATCH -n 2\n#SBATCH -t 2\n"
                                "srun python -m hpclm.dist\n"
                                "mpirun python -m hpclm.dist\n"
                                f"srun --output={tmp_path}/info-%t.json python -m hpclm info --json --all-ranks\n",
                         tmp_path)
    info = slurm.wait(job_id, timeout=120)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text
    lines = [line for line in text.splitlines() if line.startswith("hpclm.dist:")]
    assert len(lines) == 2 and all("backend=horovod ranks=2" in line and line.endswith("OK") for line in lines), text
    launches = [json.loads((tmp_path / f"info-{t}.json").read_text())["launch"] for t in (0, 1)]
    assert [(la["launched_by"], la["rank"], la["size"], la["local_rank"]) for la in launches] == \
        [("pmix", 0, 2, 0), ("pmix", 1, 2, 1)]


def _train_args(data_dir, *extra):
    sets = [f"data.path={json.dumps(str(data_dir))}", *TINY, *extra]
    return [a for kv in sets for a in ("--set", kv)]


def _submit_train(slurm, tmp_path, out, args, *sbatch_args):
    """train.sbatch with OUT as HPCLM_OUT, or (out=None) with whatever args say."""
    log = tmp_path / "train-%j.out"
    env = job_env(HPCLM_OUT=str(out)) if out is not None else job_env()
    job_id = slurm.sbatch("-n", "2", "-o", str(log), *sbatch_args, str(REPO / "slurm" / "train.sbatch"),
                          "configs/demo.toml", *args, cwd=REPO, env=env)
    return job_id, Path(str(log).replace("%j", str(job_id)))


@requires_horovod
def test_train_sbatch_runs_to_a_sample(slurm, shakespeare_dir, tmp_path):
    out = tmp_path / "run"
    job_id, log = _submit_train(slurm, tmp_path, out, _train_args(shakespeare_dir, "train.max_iters=30",
                                                                  "checkpoint.every_iters=10"))
    info = slurm.wait(job_id, timeout=180)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert (out / "checkpoints" / "latest").read_text().strip().endswith("30")
    assert {r["ranks"] for r in records(out, "train")} == {2} and records(out, "train")[-1]["step"] == 30
    sample = text.split("done: step 30", 1)[1].split("\n", 1)[1]  # what hpclm generate printed after the summary
    chars = set(json.loads((shakespeare_dir / "tokenizer.json").read_text())["chars"])
    # the prompt (a newline) and the script's 200 new tokens, all from the vocabulary, then print's newline
    assert len(sample) == 1 + 200 + 1 and set(sample) <= chars, repr(sample)


# PYTHON for train.sbatch in the preemption test. Until the job's second restart the trainer runs without
# end (only the test's signals stop it, however late they arrive); the last run trains 30 steps past the
# newest checkpoint. On the first run, rank 1 turns its exit code 75 into 143: what srun reports when it
# kills a rank still exiting, so the script must requeue on OUT/preempted alone.
PREEMPTION_PYTHON = """#!/bin/bash
trap '' USR1  # Slurm signals every process of the step: this shell must outlive python (which handles it)
extra=()
if [ "$1 $2 $3" = "-m hpclm train" ]; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt 2 ]; then extra=(--set train.max_iters=100000)
  else extra=(--set "train.max_iters=$(( $(cat "$TEST_OUT/checkpoints/latest") + 30 ))"); fi
fi
"$TEST_PYTHON" "$@" "${extra[@]}"; rc=$?
if [ "$rc" = 75 ] && [ -z "$SLURM_RESTART_COUNT" ] && [ "$SLURM_PROCID" = 1 ]; then
  echo "test wrapper: rank 1 exits 143 instead of 75" >&2; exit 143
fi
exit $rc
"""


def _wait_for_step(slurm, job_id, out, log, step, restart, deadline):
    """Until OUT's metrics reach `step` in the run of the given restart (its banner in the log); fails at
    once if the job ended."""
    while time.time() < deadline and slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING", "REQUEUED",
                                                                            "CONFIGURING", "COMPLETING"):
        banner = restart == 0 or (log.exists() and f"restart {restart}" in log.read_text())
        if banner and (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(out, "train")):
            return
        time.sleep(0.2)
    pytest.fail(f"restart {restart} did not reach step {step} (job {slurm.job(job_id).get('JobState')}): "
                f"{log.read_text() if log.exists() else 'no log'}")


# PYTHON for train.sbatch in the hang test: on the job's first run rank 1 stops itself (SIGSTOP) at step 12.
HANG_PYTHON = """#!/bin/bash
extra=()
if [ "$1 $2 $3" = "-m hpclm train" ] && [ -z "${SLURM_RESTART_COUNT:-}" ]; then
  extra=(--set debug.inject_hang_rank=1 --set debug.inject_hang_at=12)
fi
exec "$TEST_PYTHON" "$@" "${extra[@]}"
"""


@requires_horovod
def test_a_hung_rank_requeues_the_job_which_resumes_and_finishes(slurm, shakespeare_dir, tmp_path):
    out, wrapper, log = tmp_path / "run", tmp_path / "python", tmp_path / "train-%j.out"
    wrapper.write_text(HANG_PYTHON)
    wrapper.chmod(0o755)
    args = _train_args(shakespeare_dir, "train.max_iters=30", "checkpoint.every_iters=5", "train.eval_interval=0",
                       "anomaly.hang_timeout_s=4.0")
    job_id = slurm.sbatch("-n", "2", "-o", str(log), str(REPO / "slurm" / "train.sbatch"), "configs/demo.toml", *args,
                          "--out", str(out), cwd=REPO, env=job_env(PYTHON=str(wrapper), TEST_PYTHON=sys.executable))
    info = slurm.wait(job_id, timeout=hang_guard(150))
    text = Path(str(log).replace("%j", str(job_id))).read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "hpclm train: hang: rank 0's step 12" in text and "a rank hung (srun exit code" in text, text
    assert "rank 1: no heartbeat for" in (out / "hang" / "rank-0.txt").read_text()
    assert "resumed from" in text and records(out, "train")[-1]["step"] == 30


@requires_horovod
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, shakespeare_dir, tmp_path):
    """Two preemptions by USR1 (the first ending in srun exit code 143 with OUT/preempted, the second in
    75 or, as srun decides, 143), each a checkpoint and a requeue; the final log has every step once, with an uninterrupted run's
    losses bit for bit."""
    args = _train_args(shakespeare_dir, "optim.lr_decay_iters=200", "checkpoint.every_iters=50", "model.dropout=0.1",
                       "train.eval_interval=50")
    out = tmp_path / "preempted"
    wrapper = tmp_path / "python"
    wrapper.write_text(PREEMPTION_PYTHON)
    wrapper.chmod(0o755)
    log = tmp_path / "train-%j.out"
    # the run directory named by --out, and a first submission that starts over: the requeued job must
    # still resume in that directory, not start over again (--force would delete the checkpoint)
    job_id = slurm.sbatch("-n", "2", "-o", str(log), str(REPO / "slurm" / "train.sbatch"), "configs/demo.toml", *args,
                          "--out", str(out), "--resume", "never", "--force", cwd=REPO,
                          env=job_env(PYTHON=str(wrapper), TEST_PYTHON=sys.executable, TEST_OUT=str(out)))
    log = Path(str(log).replace("%j", str(job_id)))
    deadline = time.time() + hang_guard(240)
    _wait_for_step(slurm, job_id, out, log, 20, 0, deadline)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_id))
    _wait_for_step(slurm, job_id, out, log, 1, 1, deadline)
    first = checkpoint.read_latest(out)
    _wait_for_step(slurm, job_id, out, log, first + 20, 1, deadline)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_id))
    info = slurm.wait(job_id, timeout=max(10, deadline - time.time()))
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", text
    requeues = [line for line in text.splitlines() if "checkpointed on request" in line]
    codes = [line.split("srun exit code ")[1].split(")")[0] for line in requeues]
    # the first 143 (the wrapper's, or srun's kill of the wrapper); the second 75, or 143 where srun killed
    # the rank that exited last
    assert len(codes) == 2 and codes[0] == "143" and codes[1] in ("75", "143"), text
    assert "Slurm job" in text and "restart 1" in text and "restart 2" in text
    stops = [int(part.split()[0]) for part in text.split("stopped after step ")[1:]]
    assert len(stops) >= 2 and stops[0] == first and 20 <= stops[0] < stops[-1]  # rank 0's line, maybe rank 1's too
    final = checkpoint.read_latest(out)
    assert final == stops[-1] + 30

    reference = tmp_path / "reference"
    whole = mpirun(2, ["-m", "hpclm", "train", "--config", "configs/demo.toml", "--out", str(reference), *args,
                       "--set", f"train.max_iters={final}"])
    assert whole.returncode == 0, whole.stdout + whole.stderr
    got = {r["step"]: r["loss"] for r in records(out, "train")}
    want = {r["step"]: r["loss"] for r in records(reference, "train")}
    assert sorted(got) == list(range(1, final + 1))  # every step exactly once in the final log
    assert got == want  # the losses of an uninterrupted run, bit for bit


def test_bad_config_fails_fast_with_one_line(slurm, tmp_path):
    """train.sbatch's one-process --check refuses the config before srun starts any rank."""
    job_id, log = _submit_train(slurm, tmp_path, tmp_path / "bad", ["--set", "model.n_layr=2"])
    info = slurm.wait(job_id, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), (info, text)
    errors = [line for line in text.splitlines() if "error:" in line and "n_layr" in line]
    assert len(errors) == 1 and errors[0].startswith("hpclm train: error: unknown key in [model] 'n_layr'"), text
    assert "Traceback" not in text
    assert "hpclm-train: job" in text and "srun" not in text and "parameters," not in text  # no rank ever started


def test_probe_sbatch_prints_a_correct_table(slurm, tmp_path):
    out = tmp_path / "probe"
    log = tmp_path / "probe-%j.out"
    job_id = slurm.sbatch("-N", "1", "--ntasks-per-node=2", "-o", str(log), str(REPO / "slurm" / "probe.sbatch"),
                          cwd=REPO, env=job_env(HPCLM_PROBE_OUT=str(out), OMPI_MCA_mpi_yield_when_idle="1",
                                                HPCLM_PROBE_ARGS="-b 1K -e 64K -f 8 -n 2 -w 1 --impl ring,mpi,sendrecv"))
    info = slurm.wait(job_id, timeout=180)
    text = Path(str(log).replace("%j", str(job_id))).read_text()
    assert info["JobState"] == "COMPLETED", text
    doc = json.loads((out / str(job_id) / "allreduce.json").read_text())
    assert doc["host"]["ranks"] == 2 and doc["summary"]["wrong"] == 0 and doc["rows"], doc["summary"]
    assert "# Out of bounds values : 0 OK" in text
    assert (out / str(job_id) / "allreduce.png").stat().st_size > 0


def test_probe_sbatch_ends_every_rank_when_one_fails(slurm, tmp_path):
    """A rank that fails before MPI starts: srun ends the other at once instead of leaving it waiting in MPI."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/bash\n[ \"$SLURM_PROCID\" = 1 ] && exit 3\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    log = tmp_path / "probe-%j.out"
    t0 = time.time()
    job_id = slurm.sbatch("-N", "1", "--ntasks-per-node=2", "-o", str(log), str(REPO / "slurm" / "probe.sbatch"),
                          cwd=REPO, env=job_env(HPCLM_PROBE_OUT=str(tmp_path / "probe"), PYTHON=str(wrapper),
                                                HPCLM_PROBE_ARGS="-b 1K -e 4K -n 2 -w 1 --impl ring"))
    info = slurm.wait(job_id, timeout=120)
    assert info["JobState"] == "FAILED", (info, Path(str(log).replace("%j", str(job_id))).read_text())
    assert time.time() - t0 < 100
