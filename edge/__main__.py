"""`python -m edge` is the `soundsentry` command."""

import sys

from edge.cli import main

sys.exit(main())
