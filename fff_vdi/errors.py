"""Error types that carry enough context for a user to fix the input.

Every message names the file, key or value at fault and says how to fix it.
"""


class FFFVDIError(Exception):
    """Base class of the project's user-facing errors."""


class ConfigError(FFFVDIError, ValueError):
    """A configuration key holds a value we cannot use."""

    def __init__(self, key: str, value, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"config key '{key}' = {value!r}: {fix}")


class DataError(FFFVDIError, RuntimeError):
    """A dataset file (shard, index, manifest, frame, mask) is missing or corrupt."""


class WeightsError(FFFVDIError, RuntimeError):
    """Model weights are missing, gated, corrupt or in an unexpected layout."""


class InputError(FFFVDIError, ValueError):
    """User input to a command-line tool (video, masks, paths) cannot be used."""
