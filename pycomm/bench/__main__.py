"""``python -m pycomm.bench ...``: the same as the ``pycomm-bench`` console script."""
import sys

from pycomm.bench.cli import main

sys.exit(main())
