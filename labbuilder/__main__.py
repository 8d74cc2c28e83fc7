"""``python -m labbuilder``."""

import sys

from labbuilder.cli.main import main

sys.exit(main())
