"""Errors a user can cause, reported as one line by the command line (exit code 2)."""

from __future__ import annotations


class SamiError(Exception):
    """A mistake in the user's input: the message names the file or field and the fix."""

    exit_code = 2


class RunAborted(Exception):
    """A run that stopped on purpose (a guard fired): the message says why."""

    exit_code = 1
