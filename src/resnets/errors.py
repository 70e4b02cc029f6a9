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


class RunStopped(KeyboardInterrupt):
    """A training run stopped on request (SIGINT or SIGTERM) after writing its checkpoint.

    A `KeyboardInterrupt`, so code that catches `Exception` does not swallow it. `where` says
    where the run stopped and which file holds it; `signum` is the signal; `out` the run folder to
    pass to `--resume`. Its message is `where` followed by the `resnets train --resume` command.
    """

    def __init__(self, where: str, signum: int, out: str):
        super().__init__(f"{where} Resume with: resnets train --out {out} --resume")
        self.where, self.signum, self.out = where, signum, out
