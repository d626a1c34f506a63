"""Public name of hpclm.train.amp (DynamicLossScaler, LossScaleError): the same module object."""
import sys

from hpclm.train import amp as _module

sys.modules[__name__] = _module
