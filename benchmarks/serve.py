"""Serving throughput and latency (the metrics of vLLM's `bench serve`): hpclm serve with continuous batching
against the same model served one request at a time (serve.max_running = 1), both measured in this run.

A fixed prompt set from Tiny Shakespeare's val split, each request asking for --max-tokens new tokens
(streamed, greedy), sent at Poisson arrival rates (requests/s; "inf": all at once) with at most
--concurrency requests in flight. Per rate and server: request and output-token throughput; TTFT, TPOT
((e2e - ttft) / (tokens - 1)), ITL (every gap between streamed tokens) and E2E, each mean / p50 / p99; goodput
(requests/s meeting the TTFT and TPOT SLOs). Both servers run at once and take turns, --passes times per rate,
each keeping its best pass (the machine's speed drifts; every pass's throughput is recorded). A lone
request's TPOT (best of --passes) is measured first; then
`hpclm generate`'s incremental decoding against the full-recompute loop (tokens/s, same tokens).
Exit code 1 if a request failed or the two decodings differ.
Goal: at rate inf (--concurrency in flight), output tokens/s >= 6x the one-at-a-time server's, with TPOT p50
<= 2x the lone request's.

    python benchmarks/serve.py [--rates 1,4,16,inf] [--requests 32] [--json PATH] [--plot PNG]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shakespeare_data  # noqa: E402
from hpclm.bench import harness  # noqa: E402

GOAL_THROUGHPUT_RATIO = 6.0
GOAL_TPOT_RATIO = 2.0


def make_checkpoint(data_dir: Path, out: Path, n_layer: int, n_embd: int, block: int) -> Path:
    """A GPT of random weights (speed does not depend on them) saved as a normal checkpoint."""
    from hpclm import config
    from hpclm.train import train
    if not (out / "checkpoints").is_dir():
        cfg = config.load(None, [f"data.path={json.dumps(str(data_dir))}", f"model.n_layer={n_layer}",
                                 f"model.n_head={n_layer}", f"model.n_embd={n_embd}", f"data.block_size={block}",
                                 "train.max_iters=1", "train.eval_interval=0", "train.eval_iters=1",
                                 "train.batch_size=1"])
        train(cfg, out, progress_bar=False, resume="never", force=True)
    return out


class Server:
    def __init__(self, ckpt: Path, threads: int, *sets: str):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "hpclm", "serve", "--ckpt", str(ckpt), "--port", "0",
                                      "--set", f"serve.threads={threads}", *[a for s in sets for a in ("--set", s)]],
                                     stdout=subprocess.PIPE, text=True, env=env)
        got = []
        t = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(120)
        if not got or "http://" not in got[0]:
            self.proc.kill()
            raise SystemExit(f"hpclm serve did not start: {got}")
        self.url = "http://" + got[0].split("http://")[1].split("/v1")[0]

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)


async def one_request(session, url: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    arrivals = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            return {"ok": False, "status": r.status}
        async for line in r.content:  # one server-sent event line at a time
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    arrivals.append(time.perf_counter() - start)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - start
    return {"ok": True, "ttft": arrivals[0], "e2e": e2e, "tokens": tokens,
            "tpot": (e2e - arrivals[0]) / max(1, tokens - 1), "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]}


async def run_load(url: str, prompts: list[str], max_tokens: int, rate: float, concurrency: int, seed: int) -> dict:
    """The requests' results, the wall time, and the CPU seconds this client process spent (the client shares
    the server's cores: aiohttp, as vLLM's benchmark client, costs a fraction of httpx's time per event)."""
    import aiohttp
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    cpu = time.process_time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=concurrency + 4)) as session:
        async def limited(p):
            async with gate:
                return await one_request(session, url, p, max_tokens)

        start, tasks = time.perf_counter(), []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return {"duration": duration, "results": results, "client_cpu_s": time.process_time() - cpu}


def generate_speed(ckpt: Path, prompt: str, tokens: int, threads: int) -> dict:
    """hpclm generate's decoding (incremental) against the full-recompute loop it replaced: tokens/s, same
    tokens (checked), in this process."""
    import torch
    from hpclm.generate import load_trained, sample
    from hpclm.infer import SamplingParams, generate_ids
    torch.set_num_threads(threads)
    trained = load_trained(ckpt)
    ids = [int(i) for i in trained.tokenizer.encode(prompt)]
    out = {}
    for name, run in (("incremental", lambda g: generate_ids(trained.model, ids, tokens, SamplingParams(0.8, 200), g)),
                      ("full_recompute", lambda g: sample(trained.model, torch.tensor([ids]), tokens, 0.8, 200,
                                                          g)[0].tolist())):
        run(torch.Generator().manual_seed(0))
        start = time.perf_counter()
        got = run(torch.Generator().manual_seed(1))
        out[name] = {"tokens_per_s": tokens / (time.perf_counter() - start), "tokens": got}
    same = out["incremental"].pop("tokens") == out["full_recompute"].pop("tokens")
    return {**out, "same_tokens": same, "speedup": out["incremental"]["tokens_per_s"] / out["full_recompute"]["tokens_per_s"]}


def decode_step_ms(ckpt: Path, batches: list[int], context: int, steps: int, threads: int) -> dict:
    """The decoder alone, in this process: ms per batched decode step of B sequences, each at `context`
    tokens (what a served step costs before HTTP, sampling and scheduling)."""
    import torch
    from hpclm.generate import load_trained
    from hpclm.infer import make_decoder
    torch.set_num_threads(threads)
    model = load_trained(ckpt).model
    out = {}
    for b in batches:
        decoder = make_decoder(model, b)
        for slot in range(b):
            decoder.prefill(slot, [1] * context)
        decoder.decode(list(range(b)), [1] * b)
        start = time.perf_counter()
        for _ in range(steps):
            decoder.decode(list(range(b)), [1] * b)
        out[str(b)] = 1e3 * (time.perf_counter() - start) / steps
    return out


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))] if values else float("nan")


def summarise(load: dict, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in load["results"] if r["ok"]]
    out = {"completed": len(ok), "failed": len(load["results"]) - len(ok), "duration_s": load["duration"],
           "client_cpu_s": load["client_cpu_s"],
           "request_throughput": len(ok) / load["duration"],
           "output_throughput": sum(r["tokens"] for r in ok) / load["duration"],
           "goodput": sum(r["ttft"] <= slo_ttft and r["tpot"] <= slo_tpot for r in ok) / load["duration"]}
    for name, values in (("ttft", [r["ttft"] for r in ok]), ("tpot", [r["tpot"] for r in ok]),
                         ("itl", [x for r in ok for x in r["itl"]]), ("e2e", [r["e2e"] for r in ok])):
        out[name] = {"mean_ms": 1e3 * statistics.fmean(values), "p50_ms": 1e3 * pct(values, 50),
                     "p99_ms": 1e3 * pct(values, 99)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shakespeare_data.add_arguments(ap, "serve")
    ap.add_argument("--rates", default="1,4,16,inf", help="request rates, requests/s (inf: all at once)")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate (default 32)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (default 16)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-chars", type=int, default=64, help="characters (= tokens) per prompt (default 64)")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads (default 2)")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=50.0)
    ap.add_argument("--servers", default="batched,one_at_a_time", help="which servers to run (default both)")
    ap.add_argument("--passes", type=int, default=2,
                    help="passes per rate, the servers taking turns; each server's best kept (default 2)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    data_dir = shakespeare_data.prepare(args)
    block = args.prompt_chars + args.max_tokens
    ckpt = make_checkpoint(data_dir, Path(args.work).resolve() / f"gpt-{args.n_layer}x{args.n_embd}-{block}",
                           args.n_layer, args.n_embd, block)
    from hpclm.data import load_dataset, tokenizers
    val = load_dataset(data_dir, block).val
    tok = tokenizers.from_json((data_dir / "tokenizer.json").read_text(encoding="utf-8"))
    rng = random.Random(0)
    prompts = [tok.decode(val[i:i + args.prompt_chars]) for i in (rng.randrange(len(val) - args.prompt_chars)
                                                                 for _ in range(args.requests))]
    servers = {"batched": [f"serve.max_running={args.concurrency}", f"serve.max_queued={args.requests}"],
               "one_at_a_time": ["serve.max_running=1", f"serve.max_queued={args.requests}"]}
    print(f"serve benchmark: GPT {args.n_layer}x{args.n_embd} (context {block}), {args.requests} requests x "
          f"{args.max_tokens} tokens per rate, concurrency {args.concurrency}, server threads {args.threads}")
    rows, results, lone, failures = [], {}, None, 0
    chosen = [name for name in servers if name in args.servers.split(",")]
    slo = (args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    running = {}
    try:  # both servers up at once (the idle one only waits), so their passes can take turns
        for name in chosen:
            running[name] = Server(ckpt, args.threads, *servers[name])
        first = running[chosen[0]]
        asyncio.run(run_load(first.url, prompts[:2], args.max_tokens, math.inf, 1, 0))
        for _ in range(args.passes):  # a lone request's TPOT: the first server with nothing else running
            s = summarise(asyncio.run(run_load(first.url, prompts[:5], args.max_tokens, math.inf, 1, 0)), *slo)
            if lone is None or s["tpot"]["p50_ms"] < lone["tpot"]["p50_ms"]:
                lone = s
        print(f"  lone request: TPOT p50 {lone['tpot']['p50_ms']:.2f} ms, TTFT p50 {lone['ttft']['p50_ms']:.1f} ms")
        for rate in rates:
            for _ in range(args.passes):  # the servers take turns; each keeps its best pass
                for name in chosen:
                    s = summarise(asyncio.run(run_load(running[name].url, prompts, args.max_tokens, rate,
                                                       args.concurrency, 1)), *slo)
                    failures += s["failed"]  # of every pass, kept or not
                    kept = results.get((name, rate))
                    passes = (kept["passes_output_throughput"] if kept else []) + [s["output_throughput"]]
                    results[(name, rate)] = {**(s if not kept or s["output_throughput"] > kept["output_throughput"]
                                                else kept), "passes_output_throughput": passes}
            for name in chosen:
                s = results[(name, rate)]
                rows.append([name, rate, s["completed"], s["request_throughput"], s["output_throughput"],
                             s["ttft"]["p50_ms"], s["ttft"]["p99_ms"], s["tpot"]["mean_ms"], s["tpot"]["p50_ms"],
                             s["tpot"]["p99_ms"], s["itl"]["p50_ms"], s["itl"]["p99_ms"], s["e2e"]["p50_ms"],
                             s["e2e"]["p99_ms"], s["goodput"]])
                print(f"  {name} rate {rate}: {s['output_throughput']:.0f} tok/s (passes: "
                      + ", ".join(f"{x:.0f}" for x in s["passes_output_throughput"])
                      + f"), TPOT p50 {s['tpot']['p50_ms']:.1f} ms (client CPU {s['client_cpu_s'] / s['duration_s']:.0%} of a core)")
    finally:
        for server in running.values():
            server.close()
    gen = generate_speed(ckpt, prompts[0], args.max_tokens, args.threads)
    steps = decode_step_ms(ckpt, [1, args.concurrency], args.prompt_chars + args.max_tokens // 2,
                           max(1, min(32, args.max_tokens // 2 - 2)), args.threads)
    print(f"  decoder alone, a step at context {args.prompt_chars + args.max_tokens // 2}: "
          + ", ".join(f"batch {b}: {ms:.2f} ms" for b, ms in steps.items()))
    print(f"  hpclm generate, {args.max_tokens} tokens: incremental {gen['incremental']['tokens_per_s']:.0f} tokens/s, "
          f"full recompute {gen['full_recompute']['tokens_per_s']:.0f} tokens/s ({gen['speedup']:.1f}x; same tokens: "
          f"{gen['same_tokens']})")
    cols = [harness.Column("server", 13), harness.Column("rate", 5), harness.Column("done", 4)] + [
        harness.Column(title, max(9, len(title)), "{:" + fmt + "}", unit) for title, fmt, unit in (
            ("req/s", ".2f", ""), ("out tok/s", ".0f", ""), ("TTFT p50", ".0f", "ms"), ("TTFT p99", ".0f", "ms"),
            ("TPOT mean", ".1f", "ms"), ("TPOT p50", ".1f", "ms"), ("TPOT p99", ".1f", "ms"), ("ITL p50", ".1f", "ms"),
            ("ITL p99", ".1f", "ms"), ("E2E p50", ".0f", "ms"), ("E2E p99", ".0f", "ms"), ("goodput", ".2f", "req/s"))]
    print("\n".join(harness.format_table(cols, rows)))
    top = rates[-1]
    ratio = results[("batched", top)]["output_throughput"] / results[("one_at_a_time", top)]["output_throughput"]
    tpot_ratio = results[("batched", top)]["tpot"]["p50_ms"] / lone["tpot"]["p50_ms"]
    met = ratio >= GOAL_THROUGHPUT_RATIO and tpot_ratio <= GOAL_TPOT_RATIO
    failed = failures + (not gen["same_tokens"])
    print(f"at rate {top} ({args.concurrency} in flight): output tokens/s {ratio:.2f}x one-at-a-time (goal >= "
          f"{GOAL_THROUGHPUT_RATIO}), TPOT p50 {tpot_ratio:.2f}x a lone request's (goal <= {GOAL_TPOT_RATIO}): "
          f"{'met' if met else 'MISSED'}")
    if args.json:
        harness.write_json(args.json, {
            "benchmark": "serve", "host": harness.host_info(threads=args.threads),
            "settings": {k: getattr(args, k) for k in ("requests", "passes", "concurrency", "max_tokens", "prompt_chars",
                                                        "n_layer", "n_embd", "threads", "slo_ttft_ms", "slo_tpot_ms")},
            "lone": lone, "generate": gen, "decode_step_ms": steps, "runs": [{"server": n, "rate": r, **s} for (n, r), s in results.items()],
            "throughput_ratio": ratio, "tpot_ratio": tpot_ratio,
            "goal": {"throughput_ratio_min": GOAL_THROUGHPUT_RATIO, "tpot_ratio_max": GOAL_TPOT_RATIO, "met": met}})
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        labels = [str(r) for r in rates]
        for name in servers:
            a.plot(labels, [results[(name, r)]["output_throughput"] for r in rates], "o-", label=name)
            b.plot(labels, [results[(name, r)]["tpot"]["p50_ms"] for r in rates], "o-", label=name)
        b.axhline(lone["tpot"]["p50_ms"], ls=":", c="gray", label="lone request")
        a.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title="throughput")
        b.set(xlabel="request rate (req/s)", ylabel="TPOT p50 (ms)", title="time per output token")
        a.legend()
        b.legend()
        harness.save_figure(fig, args.plot)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
