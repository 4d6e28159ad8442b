"""`python -m meshlm ...` runs the `meshlm` command."""

import sys

from meshlm.cli import main

sys.exit(main())
