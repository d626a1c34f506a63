"""hpclm: language-model training for HPC clusters (fused C++/CUDA kernels, Horovod over MPI, Slurm)."""

__version__ = "0.1.0"
