"""`python -m packager.cli`: the yqpack command line."""

import sys

from packager.cli.main import main

sys.exit(main())
