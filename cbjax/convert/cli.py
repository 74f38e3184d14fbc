"""What the `convert/` scripts share: logging set-up, and expected errors as one line and exit status 1."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def run_command(parser: argparse.ArgumentParser, convert: Callable[[argparse.Namespace], Path], argv=None) -> int:
    """Parse `argv`, run `convert(args)`, and return the exit status."""
    args = parser.parse_args(argv)
    from cbjax.distributed import setup_logging

    setup_logging()
    try:
        out = convert(args)
    except (ValueError, OSError) as err:
        # ValueError includes CheckpointError; OSError includes an existing output and a missing source.
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0
