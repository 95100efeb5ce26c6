"""`python -m lamina.server ...`: the same as `lamina serve ...`."""

import sys

from lamina.server.cli import main

sys.exit(main())
