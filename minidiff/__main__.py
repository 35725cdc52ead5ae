"""`python -m minidiff …` runs the `minidiff` command line."""

import sys

from .cli import main

sys.exit(main())
