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

# The main job: prepare the offline corpus, train configs/demo.toml on $(NP) ranks, sample, plot.
demo: setup
	$(PYTHON) -m hpclm prepare stdlib --out data/stdlib-char
	$(MPIRUN) -np $(NP) $(PYTHON) -m hpclm train --config configs/demo.toml --out runs/demo --resume never --force
	$(PYTHON) -m hpclm generate --ckpt runs/demo --max-new-tokens 400
	$(PYTHON) -m hpclm report runs/demo

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup bench-allreduce
	$(PYTHON) benchmarks/reduce.py --json runs/bench/reduce.json
	$(PYTHON) benchmarks/train_shakespeare.py --json runs/bench/train_shakespeare.json

# Ring allreduce vs MPI_Allreduce vs Horovod vs sendrecv on $(NP) ranks, 64 KiB-16 MiB: enough small sizes to fit the latency.
bench-allreduce: setup
	$(MPIRUN) -np $(NP) $(PYTHON) -m hpclm probe allreduce -b 64K -e 16M -f 4 -n 10 -w 2 \
		--json runs/bench/allreduce.json --plot runs/bench/allreduce.png

info:
	$(PYTHON) -m hpclm info

clean:
	rm -rf build dist *.egg-info hpclm/_C*.so

# Fused softmax vs torch (hpclm bench softmax), 1 thread, short setting: 2 calls per figure.
.PHONY: bench-softmax
bench: bench-softmax
bench-softmax: setup
	$(PYTHON) benchmarks/softmax.py --quick --threads 1 --json runs/bench/softmax.json --plot runs/bench/softmax.png

# Data-parallel scaling: tokens/s per ranks x threads and precision, allreduce share,
# time to val loss 1.88; --quick: a few iterations per cell (the full run: python benchmarks/train_scaling.py).
.PHONY: bench-scaling
bench: bench-scaling
bench-scaling: setup
	$(PYTHON) benchmarks/train_scaling.py --quick --json runs/bench/train_scaling.json --plot runs/bench/train_scaling.png
