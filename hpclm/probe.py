"""Public name of hpclm.comm.ring (ring_allreduce): the same module object."""
import sys

from hpclm.comm import ring as _module

sys.modules[__name__] = _module
