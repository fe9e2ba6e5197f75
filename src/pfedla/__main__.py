"""``python -m pfedla``: the same as the ``pfedla`` command."""

import sys

from pfedla.cli import main

sys.exit(main())
