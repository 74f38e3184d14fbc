"""Output directories that appear only when complete: written in a staging folder, then renamed."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def check_separate(source: str | os.PathLike, out: str | os.PathLike) -> None:
    """Raise `ValueError` when replacing `out` would delete or overwrite `source`."""
    source_path = Path(source).expanduser().resolve()
    out_path = Path(out).expanduser().resolve()
    if source_path == out_path or out_path in source_path.parents:
        raise ValueError(f"output {out} contains the source {source}. Choose another output directory")


def check_output(out: str | os.PathLike, overwrite: bool) -> None:
    """Raise `FileExistsError` when `out` exists and may not be replaced."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists. Pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory. Remove it or choose another output")


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder next to `out`, and rename it to `out` when the block succeeds.

    The staging folder is a sibling of `out`, so the final rename stays on one file system. When the
    block raises, the staging folder is removed and `out` is left as it was. With `overwrite`, an
    existing `out` is replaced only after the new directory is complete.
    """
    out = Path(out).expanduser()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)

    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    # mkdtemp creates the folder as 0700, so give it the permissions that a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)
    try:
        yield stage
        _replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    logger.info("wrote %s", out)


def _replace(stage: Path, out: Path) -> None:
    if not out.exists():
        os.rename(stage, out)
        return
    backup = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(out, backup)
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup)
