"""Crash points: named places where a test build can kill the daemon with SIGKILL.

The crash tests start a real daemon with GPUWARDEN_TEST_CRASHPOINTS=1 and
GPUWARDEN_CRASHPOINT=<name>, let it reach that step, and restart it, to prove that every
step of launch and termination is recoverable. Without both variables `hit` does nothing.

Names: after_intent, after_provider_launch, after_record (launch);
after_terminating_commit, after_destroy_call (termination).
"""

from __future__ import annotations

import os
import signal

LAUNCH_POINTS = ("after_intent", "after_provider_launch", "after_record")
TERMINATION_POINTS = ("after_terminating_commit", "after_destroy_call")
ALL = LAUNCH_POINTS + TERMINATION_POINTS


def armed(name: str) -> bool:
    return (
        os.environ.get("GPUWARDEN_TEST_CRASHPOINTS") == "1"
        and os.environ.get("GPUWARDEN_CRASHPOINT") == name
    )


def hit(name: str) -> None:
    """SIGKILL this process if the test build asked to crash at `name`."""
    if armed(name):
        os.kill(os.getpid(), signal.SIGKILL)
