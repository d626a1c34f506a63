# hpclm: every target runs the idempotent set-up first, so a fresh clone needs nothing else.
PYTHON ?= python3
NP ?= 2
MPIRUN ?= mpirun $(if $(filter 0,$(shell id -u)),--allow-run-as-root,)
export PYTHON

.PHONY: setup build demo test bench bench-allreduce info clean

setup:
	bash scripts/setup.sh

# Recompile hpclm._C in place after editing csrc/ (incremental CMake build).
build:
	$(PYTHON) setup.py -q build_ext --inplace

demo: setup
	$(PYTHON) -m hpclm info
	$(MPIRUN) -np $(NP) $(PYTHON) -m hpclm.dist

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup bench-allreduce
	$(PYTHON) benchmarks/reduce.py --json runs/bench/reduce.json

# Ring allreduce vs MPI_Allreduce vs Horovod vs sendrecv on $(NP) ranks, 64 KiB-16 MiB: enough small sizes to fit the latency.
bench-allreduce: setup
	$(MPIRUN) -np $(NP) $(PYTHON) -m hpclm probe allreduce -b 64K -e 16M -f 4 -n 10 -w 2 \
		--json runs/bench/allreduce.json --plot runs/bench/allreduce.png

info:
	$(PYTHON) -m hpclm info

clean:
	rm -rf build dist *.egg-info hpclm/_C*.so
