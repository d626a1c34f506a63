"""Ranks and collectives: `dist` (launch detection, Horovod backend, the collectives training uses) and
`ring` (hpclm's own ring allreduce over MPI, from hpclm._C). Public names: hpclm.dist, hpclm.probe."""
