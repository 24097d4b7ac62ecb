"""``python -m glmtg.cli ARGS``: the same command as ``glmtg ARGS``."""

import sys

from glmtg.cli import main

sys.exit(main())
