"""The `hpclm` command (also `python -m hpclm`): every subcommand's flags are declared here, and each
runs the main(args) of its own module, imported only when chosen, so `hpclm --help` and argument
errors load neither torch nor MPI."""
from __future__ import annotations

import argparse
import importlib
import sys

from hpclm.errors import EXIT_PREEMPTED, HpclmError, Preempted


def _runs(parser: argparse.ArgumentParser, module: str) -> None:
    """The subcommand runs hpclm.<module>.main(args), imported only when chosen (torch, MPI load lazily)."""
    parser.set_defaults(func=lambda args: importlib.import_module(f"hpclm.{module}").main(args))


def _add_info(sub):
    p = sub.add_parser("info", help="build and runtime report: kernels, ISA, MPI, Horovod, CUDA")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--all-ranks", action="store_true", help="under mpirun/srun, every rank prints (default: rank 0)")
    _runs(p, "info")


SOFTMAX_SHAPES = "48x256x256,16x1024x1024,8x2048x2048"


def _add_bench(sub):
    p = sub.add_parser("bench", help="kernel benchmarks against their peers in the same run (JSON with --json)",
                       description="Exit codes: 0 when every result checked matches its reference, 1 when one "
                                   "does not, 2 for bad arguments.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    s = kinds.add_parser(
        "softmax", help="fused scaled masked softmax vs torch: forward/backward time, GB/s, speedups",
        description="hpclm.ops.fused_softmax next to torch.softmax, the unfused torch composition and autograd's "
                    "backward of it, with copy bandwidth as the ceiling, all in one run. Exit code 1 if a result "
                    "differs from torch beyond the dtype's tolerance.")
    s.add_argument("--shapes", default=SOFTMAX_SHAPES, help=f"comma-separated AxBx...xSQxSK (default {SOFTMAX_SHAPES})")
    s.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from fp32, bf16, fp16, fp64 (default fp32,bf16)")
    s.add_argument("--masks", default="causal,padding", help="comma-separated from causal, padding (default causal,padding)")
    s.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads (default: torch's current count)")
    s.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="cpu, cuda, or all (default: cpu, plus cuda rows where a GPU and a CUDA build exist)")
    s.add_argument("-n", "--iters", type=int, default=5, help="timed calls per measurement (default 5)")
    s.add_argument("-r", "--repeats", type=int, default=3, help="measurements per figure, the best is kept (default 3)")
    s.add_argument("-w", "--warmup", type=int, default=2, help="untimed calls first (default 2)")
    s.add_argument("--quick", action="store_true", help="2 calls, 1 measurement per figure (make bench)")
    s.add_argument("--malloc", choices=("retain", "system"), default="retain",
                   help="retain: glibc keeps freed memory for reuse (default); system: glibc defaults, where every "
                        "large tensor is a fresh mmap whose pages fault in (each contender pays for what it allocates)")
    s.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (default), or cpu: the calling thread's CPU time, for --threads 1 on a machine shared with "
                        "other work (preemption by other tenants does not count)")
    s.add_argument("--json", metavar="PATH", help="also write the settings and rows as JSON")
    s.add_argument("--plot", metavar="PNG", help="also plot the speedups (matplotlib)")
    _runs(s, "bench.softmax")
    r = kinds.add_parser(
        "reduce", help="the ring's reduce kernel (dst += src) on every CPU path vs numpy: time, GB/s",
        description="The elementwise sum the ring allreduce runs, on each CPU path this machine supports "
                    "(scalar, avx2, avx512, avx512_vnni), next to numpy's np.add(out=) in the same run; every path's result "
                    "is checked against numpy's (exit code 1 on a mismatch).")
    r.add_argument("--mib", type=float, default=64, help="buffer size in MiB (default 64)")
    r.add_argument("--repeat", type=int, default=20, help="timed calls per figure, the fastest is kept (default 20)")
    r.add_argument("--threads", type=int, default=1, help="OpenMP threads of the kernel (default 1)")
    r.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    _runs(r, "bench.reduce")


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin/val.bin, tokenizer.json, meta.json")
    p.add_argument("source", metavar="SOURCE", help="a text file, a directory or glob of text files, 'stdlib' (this "
                   "Python's standard library sources) or 'shakespeare' (Tiny Shakespeare, SHA-256 checked)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (data.path of a training config)")
    p.add_argument("--tokenizer", choices=("char", "bpe"), default="char", help="characters, or byte-level BPE (default: char)")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N", help="BPE vocabulary size (default: 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="last fraction of tokens held out (default: 0.1)")
    p.add_argument("--tokenizer-from", metavar="hf:DIR|nanogpt:PATH", help="tokenize with this model's tokenizer (a GPT-2 "
                   "folder's, or a nanoGPT run's meta.pkl), to fine-tune it with init.from, instead of training one")
    p.add_argument("--from", dest="local", metavar="FILE", help="shakespeare: use this local copy instead of downloading")
    p.add_argument("--force", action="store_true", help="replace an existing dataset in --out")
    _runs(p, "data.prepare")


def _add_train(sub):
    p = sub.add_parser("train", help="train a language model (one process, or every rank under mpirun/srun)")
    p.add_argument("--config", metavar="FILE", help="TOML run config (configs/*.toml); default: built-in defaults")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", choices=("auto", "never"), help="continue from OUT's latest checkpoint (auto, the "
                   "default: checkpoint.resume) or start fresh (never)")
    p.add_argument("--force", action="store_true", help="with --resume never: delete OUT's checkpoints and start over")
    p.add_argument("--check", action="store_true", help="only check the config, the data and OUT (what a start would "
                   "resume), write nothing and exit: 0 if training could start, 2 with the reason if not")
    _runs(p, "train")


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample text from a trained checkpoint")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a run directory (its latest checkpoint), a checkpoint folder, hf:DIR (a GPT-2 folder) or nanogpt:PATH (nanoGPT's ckpt.pt)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, metavar="N")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0: greedy (the likeliest token)")
    p.add_argument("--top-k", type=int, default=200, metavar="K", help="sample among the K likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="sample among the likeliest tokens whose "
                   "probabilities reach P together (1: all)")
    p.add_argument("--seed", type=int, default=1337, metavar="S")
    _runs(p, "generate")


def _add_eval(sub):
    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint over a whole val.bin")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a run directory (its latest checkpoint), a checkpoint folder, hf:DIR (a GPT-2 folder) or nanogpt:PATH (nanoGPT's ckpt.pt)")
    p.add_argument("--data", metavar="DIR", help="a prepared directory with the same tokenizer (default: the run's data.path)")
    _runs(p, "evaluate")


def _add_export(sub):
    p = sub.add_parser("export", help="a trained GPT as a folder transformers loads (GPT-2 format)")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a run directory (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--format", choices=("hf",), default="hf", help="hf: transformers' GPT2LMHeadModel folder (the default)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (replaced whole with --force)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    _runs(p, "export")


def _add_quantize(sub):
    p = sub.add_parser("quantize", help="a trained GPT or GRU with int8 or int4 weights, for generate, eval and serve",
                       description="Every matrix (a GPT's linears and tied embedding/LM head, a GRU's input, hidden "
                                   "and output matrices) in 8 or 4 bits with float32 (per channel) or float16 (per block) "
                                   "scales; norms, biases and the "
                                   "position embedding stay float32. --out becomes a run directory holding one "
                                   "checkpoint.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a run directory (its latest checkpoint), a checkpoint "
                   "folder, hf:DIR or nanogpt:PATH")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory to write (replaced whole with --force)")
    p.add_argument("--scheme", choices=("int8-channel", "int8-block32", "int4-block32"), default="int8-channel",
                   help="int8-channel: one scale per output channel (default); int8-block32: one per 32 inputs "
                        "(llama.cpp's Q8_0); int4-block32: 4 bits, one scale per 32 inputs (Q4_0)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    _runs(p, "quantize")


def _add_serve(sub):
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions)",
                       description="Continuous batching, a bounded queue (429 with Retry-After beyond it), per-client "
                                   "rate limits, Prometheus /metrics; SIGTERM drains, then exits 0.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a run directory (its latest checkpoint), a checkpoint "
                   "folder, hf:DIR or nanogpt:PATH")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, help="port (default 8000; 0: any free port, printed at start)")
    p.add_argument("--config", metavar="FILE", help="TOML file with a [serve] table (configs/serve.toml)")
    p.add_argument("--set", action="append", metavar="serve.KEY=VALUE", help="override one setting (repeatable)")
    _runs(p, "serve")


def _add_report(sub):
    p = sub.add_parser("report", help="PNG plots (loss, throughput) from a run's metrics.jsonl")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of a training run")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR)")
    _runs(p, "report")


def _add_probe(sub):
    p = sub.add_parser("probe", help="interconnect probes (run under mpirun/srun: every rank runs the command)",
                       description="Exit codes: 0 when every result checked is exact, 1 when one is not, 2 for bad "
                                   "arguments.")
    kinds = p.add_subparsers(dest="probe", required=True, metavar="PROBE")
    a = kinds.add_parser(
        "allreduce", help="ring allreduce vs MPI_Allreduce vs Horovod vs sendrecv: bandwidth, correctness, cost model",
        description="Bus bandwidth of hpclm's ring allreduce next to the MPI library's MPI_Allreduce, Horovod and "
                    "point-to-point sendrecv (nccl-tests style). Rank 0 prints one table; exit code 1 if any "
                    "result is wrong.")
    a.add_argument("-b", "--minbytes", default="64K", help="smallest message, bytes with K/M/G suffix (default 64K)")
    a.add_argument("-e", "--maxbytes", default="256M", help="largest message (default 256M)")
    a.add_argument("-f", "--stepfactor", type=float, default=4.0, help="size multiplier between rows (default 4)")
    a.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size (default 20)")
    a.add_argument("-w", "--warmup", type=int, default=5, help="untimed iterations first (default 5)")
    a.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, help="check every result exactly (default 1)")
    a.add_argument("-d", "--datatype", default="float32",
                   help="float32, float64, float16, bfloat16, comma-separated, or all (default float32)")
    a.add_argument("-o", "--op", default="sum", help="sum, avg, min, max, comma-separated, or all (default sum)")
    a.add_argument("--impl", default=None,
                   help="comma-separated from ring, mpi, horovod, sendrecv, tcp (default: all that are usable here; "
                        "tcp, a raw socket stream between neighbouring ranks, where the ranks span nodes)")
    a.add_argument("--in-place", action="store_true", help="reduce in place (default: out of place)")
    a.add_argument("--hugepages", action="store_true",
                   help="back the buffers with transparent huge pages (madvise) instead of torch's allocator")
    a.add_argument("--segment", default=None, help="ring pipeline segment, bytes (default: the ring's own, 512K)")
    a.add_argument("--depth", type=int, default=None, help="ring segments in flight per direction (default: 2)")
    a.add_argument("--threads", type=int, default=1, help="reduction threads per rank in the ring (default 1)")
    a.add_argument("--json", metavar="PATH", help="also write the rows and summary as JSON")
    a.add_argument("--plot", metavar="PNG", help="also plot busbw against size (matplotlib)")
    _runs(a, "bench.allreduce")
    pr = kinds.add_parser(
        "predict", help="a data-parallel job's step time and tokens/s at N ranks: measured compute + modelled exchange",
        description="Measures one rank's training step of the config here, then adds Horovod's allreduce of the "
                    "gradients under the ring's alpha-beta model of the job's links (a probe's fit, or a link rate); "
                    "no overlap assumed, the full-overlap bound beside it. One process: run it without mpirun.")
    pr.add_argument("--config", default=None, help="TOML run config (as hpclm train)")
    pr.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    pr.add_argument("--ranks", type=int, default=2, help="ranks of the job to predict (default 2)")
    pr.add_argument("--link-gbps", type=float, default=None, help="the links' rate in Gbit/s (caps a probe's fit)")
    pr.add_argument("--probe", metavar="JSON", default=None, help="hpclm probe allreduce --json output over the links")
    pr.add_argument("--steps", type=int, default=10, help="timed training steps for the compute (default 10)")
    pr.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    pr.add_argument("--json", metavar="PATH", help="also write the prediction as JSON")
    _runs(pr, "bench.predict")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (what is wrong, and where the help is) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hpclm", description="High-performance language-model training on HPC clusters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_info, _add_prepare, _add_train, _add_generate, _add_eval, _add_export, _add_quantize, _add_serve, _add_report, _add_bench, _add_probe):
        add(sub)
    return parser


# the commands that compute with torch: run under a caching allocator (hpclm.runtime) when one is installed
ALLOCATOR_COMMANDS = ("train", "eval", "generate", "quantize", "serve", "bench", "probe", "info")


def main(argv=None) -> int:
    """The `hpclm` process (argv None: sys.argv, and a compute command may re-execute itself under a caching
    allocator first), or one command called in-process with its arguments."""
    args = build_parser().parse_args(argv)
    try:
        if argv is None and args.command in ALLOCATOR_COMMANDS:
            from hpclm import runtime
            runtime.reexec_with_allocator()
        return args.func(args) or 0
    except HpclmError as e:
        print(f"hpclm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        from hpclm.comm.dist import launch_env
        if launch_env().rank == 0:  # every rank stops alike; one says why
            print(f"hpclm {args.command}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
