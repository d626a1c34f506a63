"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""


class HpclmError(Exception):
    """A problem with input, configuration or environment, stated so the user knows what to do."""


class DistError(HpclmError):
    """The distributed set-up cannot work as launched (e.g. several ranks but no usable Horovod)."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run the same command again


class Preempted(Exception):
    """Training stopped at a step boundary after USR1/TERM, with a checkpoint written: requeue and resume."""
