"""Tensor parallelism (Megatron-LM's split of a GPT over the ranks of a TP group).

    groups.py    which ranks form a TP group, and the collectives among them (hpclm's C++ over MPI, or torch.distributed)
    mappings.py  the communication steps as autograd functions: copy-to / reduce-from / gather-from the TP region
    layers.py    column- and row-parallel linears, the vocab-parallel embedding and cross-entropy
    gpt.py       a hpclm GPT split over a TP group, and full <-> shard state dicts
"""
