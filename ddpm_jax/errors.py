"""The errors a user can fix: entry points print them as one `error: ...` line, never a traceback.

A leaf module (no project imports), so any layer can raise them without importing another.
"""


class UserError(Exception):
    """An input the user can fix (config, flags, workdir, data); entry points print it without a traceback."""


class ConfigError(UserError, ValueError):
    """A config value or flag that cannot work; the message names the field and the fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the model."""


class DataError(UserError, RuntimeError):
    """A dataset that cannot be read or downloaded here."""


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last good state was saved."""


class WorkdirLocked(UserError, RuntimeError):
    """Another live run holds the workdir."""


class FidWeightsError(UserError, RuntimeError):
    """The FID Inception weights file is missing, cannot be downloaded, or is not the expected file."""
