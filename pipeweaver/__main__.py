"""`python -m pipeweaver`: the same command as the `pipeweaver` console script."""

import sys

from pipeweaver.cli import main

sys.exit(main())
