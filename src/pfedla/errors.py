"""The project's error types: every expected failure is one of these, with a specific message."""


class PfedlaError(Exception):
    """Base class for every error pfedla reports to a user."""


class ConfigError(PfedlaError):
    """An invalid configuration value; the message names the key and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(PfedlaError):
    """A dataset that is missing, unreadable or inconsistent."""


class ArtifactError(PfedlaError):
    """A stored model, checkpoint or update that is missing, corrupt or does not fit."""
