"""Errors a user can fix. Their message is one line: `<where>: <what is wrong>; <the fix>`."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, dataset row, model path, batch sizes). The CLI prints it as one
    `error: ...` line and exits with status 2, without a traceback."""


class DataError(UserError):
    """A dataset file or row that cannot be used; the message names the file, line and field."""


class NonFiniteError(UserError):
    """A loss or gradient norm that is NaN or infinite: the step is not taken, so no weight
    and no checkpoint is ever non-finite, and the stage fails instead of succeeding."""
