"""Back large host allocations with transparent huge pages, for training on CPU.

XLA:CPU allocates each step's temporary buffer (gigabytes for a train step) afresh and frees it
at the end, so every step faults its pages in again. Measured on the SmolLM2 benchmark step
(scripts/benchmark.py, 2 cores), that was 1.4 million page faults and about a quarter of the
step's time. glibc's `hugetlb` tunable makes
malloc ask for huge pages, which cuts the faults 500-fold. glibc reads tunables only at process
start, so `reexec_with_huge_pages` restarts the current script with the setting once, before
JAX is imported. It does nothing where the setting is already present, on a non-Linux system,
or when CBJAX_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def environment_with_huge_pages(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Return a copy of `environ` (default: this process's) with the huge-page tunable added."""
    env = dict(os.environ if environ is None else environ)
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def reexec_with_huge_pages() -> None:
    """Restart this Python script with the huge-page tunable unless it already has it."""
    if not sys.platform.startswith("linux") or os.environ.get("CBJAX_HUGE_PAGES", "1") == "0":
        return
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    if "jax" in sys.modules:  # A restart now would repeat the work done since start-up.
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], environment_with_huge_pages())
