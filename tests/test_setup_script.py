"""scripts/setup.sh on a machine without Open MPI and without apt names what to install, and changes nothing."""
import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_setup_without_mpi_or_apt_names_the_packages(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with Python and the basics, but no mpirun/mpicc/apt-get
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    for tool in ("bash", "env", "dirname", "id", "date", "g++", "awk", "nproc"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "missing openmpi-bin libopenmpi-dev" in err[0] and "apt-get install openmpi-bin libopenmpi-dev" in err[0]
    assert "installing" not in proc.stdout  # stopped before touching anything
