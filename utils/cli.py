"""Command-line plumbing every entry point shares: one-line errors with an exit status, and a parser
that reports its own errors that way."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn


class ReportedError(Exception):
    """An error the user gets as one line on stderr (no traceback) and exit status ``exit_status``."""

    exit_status = 2


class UserError(ReportedError):
    """A mistake in the user's input: one line, exit status 2, nothing written."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and which spells flags both ways."""

    def error(self, message: str) -> NoReturn:
        # "argument --vis-port/--vis_port: must be ..." reads "--vis-port must be ..."
        raise UserError(re.sub(r"^argument (--[\w-]+)(?:/[-\w]+)*: ", r"\1 ", message))

    def flag(self, *names: str, **kwargs: Any) -> argparse.Action:
        """Add a flag under its hyphen and underscore spellings (``--batch-size``, ``--batch_size``)."""
        spelled = list(names) + ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--")]
        return self.add_argument(*dict.fromkeys(spelled), **kwargs)


def positive_int(value: object) -> int:
    """An argparse type: a whole number of at least 1."""
    number = _whole(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {number}")
    return number


def tcp_port(value: object) -> int:
    """An argparse type: a TCP port number, 1..65535."""
    number = _whole(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {number}")
    return number


def _whole(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None


def run_script(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run an entry point: a ``ReportedError`` becomes one line on stderr and its exit status.

    ``METAPRUNE_DEBUG=1`` re-raises instead, for a traceback.
    """
    prog = Path(sys.argv[0]).name
    try:
        main(argv)
    except ReportedError as e:
        if os.environ.get("METAPRUNE_DEBUG"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
