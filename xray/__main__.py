"""Entry point for `python -m xray`."""

import sys

from xray.cli import main

sys.exit(main())
