"""The huge-page environment that the training and benchmark scripts run under."""

import subprocess
import sys
from pathlib import Path

from cbjax.host_memory import TUNABLE, environment_with_huge_pages

REPO = Path(__file__).resolve().parents[1]


def test_tunable_added_to_empty_environment():
    assert environment_with_huge_pages({})["GLIBC_TUNABLES"] == TUNABLE


def test_tunable_appended_to_existing_tunables():
    env = environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"


def test_existing_hugetlb_setting_kept():
    env = environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def test_script_restarts_with_tunable(tmp_path):
    script = tmp_path / "print_tunables.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from cbjax.host_memory import reexec_with_huge_pages\n"
        "reexec_with_huge_pages()\nprint(os.environ.get('GLIBC_TUNABLES', ''))\n"
    )
    env = {k: v for k, v in environment_with_huge_pages().items() if k != "GLIBC_TUNABLES"}
    output = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == (TUNABLE if sys.platform.startswith("linux") else "")

    opted_out = subprocess.run(
        [sys.executable, str(script)], env=dict(env, CBJAX_HUGE_PAGES="0"), capture_output=True, text=True, check=True
    )
    assert opted_out.stdout.strip() == ""
