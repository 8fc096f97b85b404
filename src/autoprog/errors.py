"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class AutoprogError(Exception):
    """Base class for mistakes in input, configuration or environment that the user can fix."""


class ConfigError(AutoprogError, ValueError):
    """An option, config file or schedule is invalid."""


class DataError(AutoprogError):
    """A dataset is missing or malformed."""


class DivergedError(AutoprogError):
    """Training diverged (a non-finite loss, gradient or sample): stopped before it could be saved or scored."""
