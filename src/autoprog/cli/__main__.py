"""``python -m autoprog.cli``: the ``autoprog`` command (what ``torchrun`` launches)."""

from . import entry

entry()
