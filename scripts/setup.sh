#!/usr/bin/env bash
# One-command set-up: Open MPI, PyTorch, mpi4py, Horovod (MPI + PyTorch), then hpclm itself.
# Idempotent: every step checks first and is skipped when its piece already works.
# Usage: scripts/setup.sh            (also: make setup)
#   PYTHON=python3.11 scripts/setup.sh   choose the interpreter
#   HPCLM_SETUP_SKIP_HOROVOD=1           skip the Horovod build (single-process use only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check --no-input)
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
t0=$(date +%s)

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
has_py() { "$PY" -c "$1" >/dev/null 2>&1; }

command -v "$PY" >/dev/null || die "no '$PY' on PATH; install Python >= 3.11 or set PYTHON=/path/to/python"
has_py 'import sys; assert sys.version_info >= (3, 11)' || die "$PY is older than 3.11 (hpclm reads TOML with tomllib); set PYTHON to a newer interpreter"

# 1. System packages: Open MPI (runtime + headers), a C++ compiler, jemalloc, and, where no Slurm is
#    installed at all (a workstation or CI, not a cluster's login node), a local Slurm + munge
#    for the tests that start a real cluster (one node, or namespace nodes).
apt_pkgs=()
command -v mpirun >/dev/null && command -v mpicc >/dev/null || apt_pkgs+=(openmpi-bin libopenmpi-dev)
command -v g++ >/dev/null || apt_pkgs+=(g++)
command -v sbatch >/dev/null || apt_pkgs+=(slurmctld slurmd slurm-client munge)
# iproute2 and util-linux for the namespace cluster (hpclm.cluster: ip, tc, nsenter, unshare, taskset), which
# only root can make: asked for as root only
if [ "$(id -u)" = 0 ]; then
  command -v ip >/dev/null && command -v tc >/dev/null || apt_pkgs+=(iproute2)
  command -v nsenter >/dev/null && command -v unshare >/dev/null && command -v taskset >/dev/null || apt_pkgs+=(util-linux)
fi
# jemalloc: the caching allocator hpclm preloads at launch, looked for where hpclm.runtime looks
has_py 'import sys; sys.path.insert(0, "."); from hpclm import runtime; assert runtime.find("jemalloc")' || apt_pkgs+=(libjemalloc2)
# apt-get runs as root, or through sudo for a user who may use it (without a password, or asked for one
# on this terminal).
as_root=()
[ "$(id -u)" = 0 ] || as_root=(sudo DEBIAN_FRONTEND=noninteractive)
can_apt() {
  command -v apt-get >/dev/null || return 1
  ((${#as_root[@]} == 0)) && return 0
  command -v sudo >/dev/null && { sudo -n true 2>/dev/null || [ -t 0 ]; }
}
if ((${#apt_pkgs[@]})); then
  if can_apt; then
    say "installing ${apt_pkgs[*]} with ${as_root[0]:+sudo }apt-get"
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
  else
    die "missing ${apt_pkgs[*]}: install them (Debian/Ubuntu: 'sudo apt-get install ${apt_pkgs[*]}'; clusters: 'module load openmpi gcc'), then rerun"
  fi
else
  say "Open MPI: $(mpirun --version 2>/dev/null | head -n1); Slurm client: $(command -v sbatch)"
fi

# 2. PyTorch: never replace an existing install (it may be a user's CUDA build).
if has_py 'import torch'; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
else
  say "installing torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

# 3. Build tools and Python MPI bindings.
py_pkgs=()
has_py 'import numpy' || py_pkgs+=(numpy)
has_py 'import pybind11' || py_pkgs+=("pybind11>=2.11")
has_py 'import setuptools, sys; assert int(setuptools.__version__.split(".")[0]) >= 77' || py_pkgs+=("setuptools>=77")
has_py 'import wheel' || py_pkgs+=(wheel)
has_py 'from mpi4py import MPI' || py_pkgs+=(mpi4py)
if ! command -v cmake >/dev/null || ! cmake --version | awk 'NR==1{split($3,v,"."); exit !(v[1]>3 || (v[1]==3 && v[2]>=21))}'; then
  py_pkgs+=("cmake>=3.21")
fi
if ((${#py_pkgs[@]})); then
  say "installing ${py_pkgs[*]}"
  "${PIP[@]}" "${py_pkgs[@]}"
fi

# 4. Horovod with MPI and PyTorch, compiled through scripts/cxx17 (Horovod asks for C++14, torch's headers need C++17).
horovod_ok='import horovod.torch as hvd; assert hvd.mpi_built()'
if [ "${HPCLM_SETUP_SKIP_HOROVOD:-0}" = 1 ]; then
  say "skipping Horovod (HPCLM_SETUP_SKIP_HOROVOD=1)"
elif has_py "$horovod_ok"; then
  say "Horovod $("$PY" -c 'import horovod; print(horovod.__version__)') with MPI already installed"
else
  say "building Horovod $HOROVOD_VERSION with MPI + PyTorch (about 4 minutes on 2 cores)"
  HPCLM_REAL_CXX=$(command -v g++) CXX="$PWD/scripts/cxx17" MAKEFLAGS="-j$(nproc)" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=1 \
    "${PIP[@]}" --no-build-isolation --no-cache-dir "horovod==$HOROVOD_VERSION"
  has_py "$horovod_ok" || die "Horovod installed but 'import horovod.torch' fails or lacks MPI; see 'horovodrun --check-build'"
fi

# 5. hpclm itself, editable, with test/plot extras. When it is already installed from
#    this checkout with every dependency in pyproject.toml, only the incremental CMake build runs.
installed_here='
import importlib.metadata as md, os, sys, tomllib
from packaging.requirements import Requirement
import hpclm
assert os.path.realpath(os.path.dirname(hpclm.__file__)) == os.path.realpath(sys.argv[1] + "/hpclm")
project = tomllib.load(open(sys.argv[1] + "/pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
    req = Requirement(spec)
    assert md.version(req.name) in req.specifier or req.specifier.contains(md.version(req.name), prereleases=True)
'
if (cd / && "$PY" -c "$installed_here" "$OLDPWD") >/dev/null 2>&1; then
  say "hpclm installed from this checkout; rebuilding hpclm._C incrementally"
  "$PY" setup.py -q build_ext --inplace >/dev/null
else
  say "installing hpclm (pip install -e .[dev])"
  "${PIP[@]}" --no-build-isolation -q -e ".[dev]"
fi
(cd / && "$PY" -c 'import hpclm._C') || die "hpclm._C does not import after the build; rerun 'pip install -v -e .' to see the compiler output"
say "done in $(( $(date +%s) - t0 )) s; check the stack with 'hpclm info'"
