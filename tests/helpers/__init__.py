"""Helpers of the test suite: fixtures, scripts run under mpirun, the local Slurm cluster."""
