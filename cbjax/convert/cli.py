"""Logging set-up and error reporting shared by the `convert/` scripts.

An expected error (invalid input, existing output, missing file) prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def run_command(parser: argparse.ArgumentParser, convert: Callable[[argparse.Namespace], Path], argv=None) -> int:
    """Parse `argv`, run `convert(args)`, and return the exit status."""
    args = parser.parse_args(argv)
    from cbjax.distributed import setup_logging

    setup_logging()
    try:
        out = convert(args)
    except (ValueError, OSError) as err:
        # ValueError covers CheckpointError, and OSError covers an existing output and a missing source.
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0
