import sys

from hpclm.cli import main

sys.exit(main())
