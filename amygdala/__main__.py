"""``python -m amygdala``: the same as the ``amygdala`` command."""

import sys

from amygdala.cli.main import main

sys.exit(main())
