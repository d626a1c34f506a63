"""Run under mpirun by tests/test_tensor_parallel.py: each TP group of BACKEND (mpi | torch) checks its
collectives against MPI_Allreduce, its GPT shards against the T=1 GPT built with the same seed (initial
slices, loss, logits, every gradient) and 30 AdamW steps against T=1; writes OUTDIR/rank<r>.json.

argv: OUTDIR TENSOR BACKEND"""
import json
import os
import sys
import traceback

import numpy as np
import torch
from mpi4py import MPI

from hpclm.models.gpt import GPT
from hpclm.parallel.gpt import TensorParallelGPT, shard_spec, shard_tensor, unshard_tensor
from hpclm.parallel.groups import Layout, MPIGroup, make_group

out_dir, tensor, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
world = MPI.COMM_WORLD
rank = world.Get_rank()
torch.set_num_threads(1)
result = {"rank": rank, "failures": [], "checked": 0}


def check(ok, what):
    result["checked"] += 1
    if not ok:
        result["failures"].append(f"rank {rank}: {what}")


def worst(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def collectives(group):
    tp = MPI.COMM_WORLD.Split(color=layout.dp_rank, key=layout.tp_rank)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        # mpi backend: 1 and 768 through one piece of shared memory (or doubling), 100_000 float32 in two
        # pieces (bfloat16 one, float64 the ring), 300_000 the ring
        for count in (1, 768, 100_000, 300_000):
            gen = torch.Generator().manual_seed(1000 * rank + count)
            x = torch.randn(count, generator=gen, dtype=torch.float64).to(dtype)
            for op in ("sum", "max"):
                got = group.allreduce(x, op)
                ref = np.empty(count, dtype=np.float64)
                tp.Allreduce(x.double().numpy(), ref, op=MPI.SUM if op == "sum" else MPI.MAX)
                tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 0.05}[dtype] * group.size
                check(got.dtype == dtype and got.shape == x.shape, f"{op} {dtype} {count}: shape/dtype changed")
                check(worst(got, torch.from_numpy(ref)) <= tol, f"{op} {dtype} {count}: off by "
                      f"{worst(got, torch.from_numpy(ref))} from MPI_Allreduce")
                bits = got.view(torch.int16 if dtype == torch.bfloat16 else torch.int64 if dtype == torch.float64
                                else torch.int32).numpy()
                everyone = tp.allgather(bits.tobytes())
                check(all(b == everyone[0] for b in everyone), f"{op} {dtype} {count}: TP ranks disagree in bits")
                y = x.clone()
                again = group.allreduce(y, op, inplace=True)  # the mappings' call: into y itself
                check(again is y and torch.equal(y, got), f"{op} {dtype} {count}: in place differs from out of place")
        piece = torch.full((3, 2), float(group.rank), dtype=dtype)
        gathered = group.allgather(piece, dim=-1)
        want = torch.cat([torch.full((3, 2), float(r), dtype=dtype) for r in range(group.size)], dim=-1)
        check(torch.equal(gathered, want), f"allgather {dtype}: {gathered.tolist()}")


def models(group, bias, vocab):
    kw = dict(vocab_size=vocab, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=bias)
    torch.manual_seed(1234)
    reference = GPT(**kw).double()
    torch.manual_seed(1234)
    tp = TensorParallelGPT(GPT(**kw), group).double()
    full = reference.state_dict()
    for name, shard in tp.state_dict().items():  # 1. every shard is the slice of the T=1 model
        check(torch.equal(shard, shard_tensor(name, full[name].clone(), group.size, group.rank).to(shard.dtype)),
              f"init {name}: the shard is not the slice of the T=1 model")
    back = tp.full_state_dict()
    check(set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full),
          "full_state_dict does not give back the T=1 model")

    gen = torch.Generator().manual_seed(7)  # same data on every rank of the group
    idx = torch.randint(0, vocab, (3, 16), generator=gen)
    targets = torch.randint(0, vocab, (3, 16), generator=gen)
    targets[0, :5] = -1  # ignored positions
    targets[1, 3] = vocab - 1  # the last real token: on the last shard, next to the padding
    for model in (reference, tp):
        model.zero_grad()
    _, ref_loss = reference(idx, targets)
    _, tp_loss = tp(idx, targets)
    ref_loss.backward()
    tp_loss.backward()
    check(abs(ref_loss.item() - tp_loss.item()) <= 1e-10, f"loss {tp_loss.item()} vs {ref_loss.item()}")
    ref_logits, _ = reference(idx)
    tp_logits, _ = tp(idx)
    check(tp_logits.shape == ref_logits.shape and worst(tp_logits, ref_logits) <= 1e-10,
          f"generation logits differ: {tuple(tp_logits.shape)}, {worst(tp_logits, ref_logits)}")
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, p in tp.named_parameters():  # 2. every gradient equals the T=1 gradient
        full_grad = unshard_tensor(name, tp.gather_pieces(p.grad), vocab) if shard_spec(name) else p.grad
        check(worst(full_grad, ref_grads[name]) <= 1e-10, f"grad {name}: off by {worst(full_grad, ref_grads[name])}")
    result[f"loss_bias{int(bias)}_v{vocab}"] = tp_loss.item()


def training(group, steps=30):
    kw = dict(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True)
    torch.manual_seed(99)
    reference = GPT(**kw)
    torch.manual_seed(99)
    tp = TensorParallelGPT(GPT(**kw), group)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1) for m in (reference, tp)]
    gen = torch.Generator().manual_seed(5)
    ref_losses, tp_losses = [], []
    for _ in range(steps):
        idx = torch.randint(0, 65, (4, 16), generator=gen)
        targets = torch.roll(idx, -1, dims=1)
        for model, opt, losses in ((reference, opts[0], ref_losses), (tp, opts[1], tp_losses)):
            opt.zero_grad(set_to_none=True)
            _, loss = model(idx, targets)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    result["ref_losses"], result["tp_losses"] = ref_losses, tp_losses
    check(max(abs(a - b) for a, b in zip(ref_losses, tp_losses)) <= 1e-4,
          f"30 steps: losses differ by {max(abs(a - b) for a, b in zip(ref_losses, tp_losses))}")
    final = tp.full_state_dict()
    check(all(worst(final[k], v) <= 1e-4 for k, v in reference.state_dict().items()),
          "after 30 steps the gathered T=2 model is not the T=1 model")
    tp_comm = MPI.COMM_WORLD.Split(color=layout.dp_rank, key=layout.tp_rank)
    for name, p in tp.named_parameters():  # replicated parameters: the same bits on every TP rank
        if shard_spec(name) is None:
            everyone = tp_comm.allgather(p.detach().numpy().tobytes())
            check(all(b == everyone[0] for b in everyone), f"replicated {name} differs between TP ranks")


layout = Layout(world.Get_size(), tensor, rank)
try:
    if backend == "torch":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    group = make_group(layout, backend)
    result["group"] = [group.name, group.size, group.rank]
    result["transport"] = group.transport
    collectives(group)
    if backend == "mpi":  # the MPI paths (doubling, ring) where shared memory is not to be had
        without_shm = MPIGroup(layout, shm_bytes=0)
        result["transport_without_shm"] = without_shm.transport
        collectives(without_shm)
    for bias, vocab in ((True, 65), (False, 64), (False, 3 * 7)):
        models(group, bias, vocab)
    training(group)
    result["collective_calls"] = group.calls
except Exception:
    result["crash"] = traceback.format_exc()
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
