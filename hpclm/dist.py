"""Public name of hpclm.comm.dist (ranks and collectives): the same module object.
`python -m hpclm.dist` runs its self-check under mpirun."""
import sys

from hpclm.comm import dist as _module

if __name__ == "__main__":
    sys.exit(_module.selfcheck_main())
sys.modules[__name__] = _module
