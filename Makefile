# hpclm: every target runs the idempotent set-up first, so a fresh clone needs nothing else.
PYTHON ?= python3
NP ?= 2
MPIRUN ?= mpirun $(if $(filter 0,$(shell id -u)),--allow-run-as-root,)
export PYTHON

.PHONY: setup build demo test bench bench-full bench-softmax bench-reduce bench-allreduce bench-scaling \
	bench-scaling-full bench-shakespeare bench-ttt bench-serve bench-quant bench-tp bench-multinode info clean

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
	$(PYTHON) -m pytest -q --durations=25 tests

# The quick benchmarks (a few minutes in all): the kernels against their peers, the allreduce probe and a
# short scaling run; each writes runs/bench/NAME.json (and a PNG). Exit code 1: a result was wrong.
bench: bench-softmax bench-reduce bench-allreduce bench-scaling

# The long studies (tens of minutes each): nanoGPT's CPU run against a plain loop, and every scaling cell.
bench-full: bench-shakespeare bench-ttt bench-scaling-full bench-serve bench-quant bench-tp bench-multinode

# Fused softmax vs torch, 1 thread, short setting: 2 calls per figure.
bench-softmax: setup
	$(PYTHON) -m hpclm bench softmax --quick --threads 1 --json runs/bench/softmax.json --plot runs/bench/softmax.png

# The ring's reduce kernel on every CPU path vs numpy.
bench-reduce: setup
	$(PYTHON) -m hpclm bench reduce --json runs/bench/reduce.json

# Ring allreduce vs MPI_Allreduce vs Horovod vs sendrecv on $(NP) ranks, 64 KiB-16 MiB: enough small sizes to fit the latency.
bench-allreduce: setup
	$(MPIRUN) -np $(NP) $(PYTHON) -m hpclm probe allreduce -b 64K -e 16M -f 4 -n 10 -w 2 \
		--json runs/bench/allreduce.json --plot runs/bench/allreduce.png

# Data-parallel scaling, a few iterations per cell (tokens/s per ranks x threads and precision, allreduce share).
bench-scaling: setup
	$(PYTHON) benchmarks/train_scaling.py --quick --json runs/bench/train_scaling.json --plot runs/bench/train_scaling.png

bench-scaling-full: setup
	$(PYTHON) benchmarks/train_scaling.py --json runs/bench/train_scaling.json --plot runs/bench/train_scaling.png

# hpclm train vs a plain PyTorch loop on nanoGPT's documented CPU run (val loss at 2000 steps, tokens/s).
bench-shakespeare: setup
	$(PYTHON) benchmarks/train_shakespeare.py --json runs/bench/train_shakespeare.json

# Time to whole-split val loss 1.88: shakespeare-char and shakespeare-fast vs nanoGPT's CPU run replayed, 3 seeds,
# and the levers' tokens/s (about 16 minutes).
bench-ttt: setup
	$(PYTHON) benchmarks/time_to_target.py --json runs/bench/time_to_target.json

# Weight-quantized decoding and prefill (int8, int4) vs fp32, bf16 and torch.ao's int8 (GPT 6x384 and 12x768).
bench-quant: setup
	$(PYTHON) benchmarks/quant.py --json runs/bench/quant.json --plot runs/bench/quant.png

# hpclm serve with continuous batching vs one request at a time (Poisson rates 1, 4, 16, inf; GPT 6x384).
bench-serve: setup
	$(PYTHON) benchmarks/serve.py --json runs/bench/serve.json --plot runs/bench/serve.png

# Tensor parallel on 2 ranks: bytes/RSS per rank, tokens/s of T=2 vs D=2 vs T=1, TP allreduce vs mpi4py/gloo/Horovod.
bench-tp: setup
	$(PYTHON) benchmarks/tensor_parallel.py --json runs/bench/tensor_parallel.json --plot runs/bench/tensor_parallel.png

# Needs root: the nodes are network namespaces.
bench-multinode: setup
	$(PYTHON) benchmarks/multinode.py --json runs/bench/multinode.json --plot runs/bench/multinode.png

info:
	$(PYTHON) -m hpclm info

clean:
	rm -rf build dist *.egg-info hpclm/_C*.so
