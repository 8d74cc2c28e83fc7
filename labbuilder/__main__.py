"""``python -m labbuilder``."""

import sys

from labbuilder.cli import main

sys.exit(main())
