"""Errors a user can cause. Front ends print them as one line; anything else is a bug."""
from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """Something the user can fix: a bad setting, a missing file, a mismatched checkpoint.

    The message speaks the library's language (parameter names, as the Python API takes them); `param` names the
    parameter at fault, so that a front end can say it its own way (the CLI names its flag, `--steps`)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class ConfigError(UserError):
    """A config file or value that does not fit the stage's config dataclass."""


class CheckpointError(UserError):
    """A checkpoint folder that is missing, incomplete, corrupt or mismatched."""


class T2iWarning(UserWarning):
    """Something the user asked for that will not come out as asked; front ends show it as one line."""


class UnknownWordsWarning(T2iWarning):
    """A prompt holds words the pipeline's training captions never used."""


class SettingWarning(T2iWarning):
    """A setting the pipeline cannot honour as asked (a distilled stage keeps its own steps)."""
