"""Errors a user can cause. Front ends print them as one line; anything else is a bug."""


class UserError(Exception):
    """Something the user can fix: a bad flag, a missing file, a mismatched checkpoint."""


class ConfigError(UserError):
    """A config file or value that does not fit the stage's config dataclass."""


class CheckpointError(UserError):
    """A checkpoint folder that is missing, incomplete, corrupt or mismatched."""
