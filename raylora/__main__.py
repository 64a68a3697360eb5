"""`python -m raylora ...`: the same as the `raylora` command (what submitted jobs run on the cluster)."""

import sys

from raylora.cli import main

sys.exit(main())
