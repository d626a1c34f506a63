"""Real Slurm: jobs submitted with sbatch to a single-node cluster this test module starts and stops."""
import json
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, child_env, requires_horovod
from slurm_cluster import LocalSlurm, missing_tools

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
