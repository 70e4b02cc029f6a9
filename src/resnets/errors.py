"""Errors a user can fix. The CLI prints their message as one `error:` line and exits with code 2."""


class ResnetsError(ValueError):
    """Base of the errors whose message tells the user what was wrong and what to do."""


class ConfigError(ResnetsError):
    """An invalid training recipe: unknown key, wrong type, value out of range."""


class DataError(ResnetsError):
    """A dataset that is missing, incomplete or unreadable."""


class CheckpointError(ResnetsError):
    """A checkpoint or weights file that is missing, corrupt or does not match."""


class TrainingError(ResnetsError):
    """A run that cannot go on, e.g. a loss that became NaN."""
