import sys

from glmtg.cli import main

sys.exit(main())
