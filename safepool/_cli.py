"""What the command-line tools share: argparse that reports a bad option as
one line and an exit code, instead of a usage dump and SystemExit."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class UsageError(Exception):
    """A bad option or value: the tool prints it as one line and exits 2."""


class Exit(Exception):
    """argparse wanted to exit (``--help``): the tool returns this code."""

    def __init__(self, code: int) -> None:
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, minus the usage dump and the SystemExit: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise Exit(status)
