"""A user-supplied judge: an external command that labels responses in place of the phrase rules.

Protocol: the command reads JSON Lines on stdin, one object per response with the fields
`prompt`, `response` and `kind` ("harmful" or "benign"). It writes one JSON object per input line
to stdout, in the same order, each with a field `label`: "refused", "broken" or "complied".
Anything it writes to stderr goes to the log.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
from collections.abc import Sequence

from cbjax.evaluation.rules import LABELS

logger = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The judge command failed or wrote output that does not follow the protocol."""


def run_judge(command: str, prompts: Sequence[str], responses: Sequence[str], kind: str, *, timeout: float = 600.0) -> list[str]:
    """Run `command` (split like a shell line, run without a shell) and return one label per response."""
    lines = [json.dumps({"prompt": p, "response": r, "kind": kind}) for p, r in zip(prompts, responses)]
    try:
        completed = subprocess.run(
            shlex.split(command),
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as err:
        raise JudgeError(f"judge command {command!r} not found: {err}") from None
    except subprocess.TimeoutExpired:
        raise JudgeError(f"judge command {command!r} timed out after {timeout:.0f} s") from None
    if completed.stderr.strip():
        logger.info("judge stderr: %s", completed.stderr.strip())
    if completed.returncode != 0:
        raise JudgeError(f"judge command {command!r} failed with exit status {completed.returncode}")
    return parse_labels(completed.stdout, len(lines), command)


def parse_labels(stdout: str, expected: int, command: str) -> list[str]:
    outputs = [line for line in stdout.split("\n") if line.strip()]
    if len(outputs) != expected:
        raise JudgeError(f"judge command {command!r} wrote {len(outputs)} lines for {expected} responses")
    labels = []
    for number, line in enumerate(outputs, start=1):
        try:
            label = json.loads(line)["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise JudgeError(
                f"judge output line {number} is not a JSON object with a 'label' field: {line[:200]!r}"
            ) from None
        if label not in LABELS:
            raise JudgeError(f"judge output line {number}: label {label!r} is invalid; expected one of {LABELS}")
        labels.append(label)
    return labels


def judge_shares(labels: Sequence[str]) -> dict[str, float]:
    count = max(len(labels), 1)
    shares = {label: sum(x == label for x in labels) / count for label in LABELS}
    shares["refused_or_broken"] = shares["refused"] + shares["broken"]
    return shares
