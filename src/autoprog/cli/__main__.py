"""``python -m autoprog.cli``: the ``autoprog`` command (what ``torchrun`` launches)."""

import sys

from . import main

sys.exit(main())
