"""`python -m soundsentry` is the `soundsentry` command."""

import sys

from soundsentry.cli import main

sys.exit(main())
