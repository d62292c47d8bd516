"""`python -m gpfm_scale ...`: the same CLI as the `gpfm-scale` entry point."""

import sys

from gpfm_scale.cli import main

sys.exit(main())
