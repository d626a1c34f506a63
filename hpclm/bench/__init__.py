"""Benchmarks and probes that ship with hpclm: `harness` (timing, tables, host, JSON and plots, shared by
all), `softmax` (hpclm bench softmax), `reduce` (hpclm bench reduce), `allreduce` (hpclm probe
allreduce) and `costmodel` (the ring's alpha-beta model)."""
