"""Pieces every ``autoprog`` command shares: the parser class, argument types, seed lists."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


class Parser(argparse.ArgumentParser):
    """argparse, but mistakes give the one-line ``autoprog: error: ...`` (exit 2) of every other error."""

    def error(self, message: str):
        self.exit(2, f"autoprog: error: {message} (see '{self.prog} --help')\n")


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` → ``[0, 1, 2]``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    return seeds
