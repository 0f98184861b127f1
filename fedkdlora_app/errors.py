"""The app's input errors: each message names the run-config key, file or node at fault.

A leaf module, so that any module can raise or catch them without importing another's code.
"""


class ConfigError(ValueError):
    """A run-config value that the app cannot use; the message names the key."""


class DataError(ValueError):
    """A data file or partition the app cannot use; the message names it."""


class ModelError(ValueError):
    """A model setting the app cannot use; the message names the key or path."""
