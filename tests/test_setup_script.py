"""scripts/setup.sh on a machine without Open MPI and without apt names what to install, and changes nothing."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import hang_guard, REPO


def test_setup_without_mpi_or_apt_names_the_packages(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with Python and the basics, but no mpirun/mpicc/apt-get
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    for tool in ("bash", "env", "dirname", "id", "date", "g++", "awk", "nproc"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=hang_guard(60))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "missing openmpi-bin libopenmpi-dev" in err[0] and "apt-get install openmpi-bin libopenmpi-dev" in err[0]
    assert "installing" not in proc.stdout  # stopped before touching anything


def _minimal_path(bin_dir, tools, python=sys.executable):
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(python)
    for tool in tools:
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))


def test_setup_as_a_user_without_root_or_sudo_names_the_packages(tmp_path):
    """apt-get is there, but the user is not root and has no sudo: the script says what to install, once."""
    if os.geteuid() != 0 or not shutil.which("runuser") or not shutil.which("apt-get"):
        pytest.skip("needs root (to run the script as the user 'nobody' with runuser) and apt-get")
    if shutil.which("sudo"):
        pytest.skip("sudo is installed: the script would try it")
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")  # one the user 'nobody' may run
    if python is None or subprocess.run(["runuser", "-u", "nobody", "--", python, "-c", "import sys; "
                                         "assert sys.version_info >= (3, 11)"]).returncode:
        pytest.skip("no Python >= 3.11 that the user 'nobody' can run")
    with tempfile.TemporaryDirectory() as scratch:  # pytest's tmp_path is private to root
        os.chmod(scratch, 0o755)
        bin_dir = Path(scratch) / "bin"
        _minimal_path(bin_dir, ("bash", "env", "dirname", "id", "date", "g++", "awk", "nproc", "apt-get"), python)
        proc = subprocess.run(["runuser", "-u", "nobody", "--", "env", "-i", f"PATH={bin_dir}", "HOME=/tmp",
                               "bash", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True,
                              timeout=hang_guard(60))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "missing openmpi-bin libopenmpi-dev" in err[0], proc.stderr
    assert "installing" not in proc.stdout
