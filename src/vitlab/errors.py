"""User-facing errors.

Anything the user can fix (a bad config key, an unknown model, a missing data directory...) raises
:class:`VitlabError` with one line saying what is wrong and how to fix it. The CLI prints that line and
exits with status 2 (3 for a run that diverged: `TrainingDiverged`); everything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class VitlabError(ValueError):
    """An error caused by user input; its message is one line naming the problem and the fix."""

    exit_code = 2


class TrainingStopped(Exception):
    """Training stopped on request (a signal) after writing its checkpoint: not an error. `exit_code` is 0 for
    SIGTERM/SIGINT and 75 for SIGUSR1 (preemption)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(VitlabError):
    """The loss or the weights stopped being finite; the last good checkpoint is kept. Exit status 3."""

    exit_code = 3


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
