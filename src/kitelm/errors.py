"""User-facing errors. The CLI prints them as one line and exits with code 2."""


class KitelmError(Exception):
    """An error caused by the user's input (config, data, checkpoint, path); the message says how to fix it."""


class ConfigError(KitelmError, ValueError):
    """An invalid model or training configuration value."""


class DataError(KitelmError):
    """Missing, empty or unreadable training data."""


class CheckpointError(KitelmError):
    """A missing, corrupt, truncated or incompatible checkpoint."""
