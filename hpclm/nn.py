"""Public name of hpclm.kernels.nn (FusedScaleMaskSoftmax): the same module object."""
import sys

from hpclm.kernels import nn as _module

sys.modules[__name__] = _module
