"""Errors the user can fix. The CLI prints them as one line and exits with EXIT_USER_ERROR."""


class UserError(Exception):
    """A problem in the job's config or data, not in the trainer. Never shown with a traceback."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class TrainingDiverged(UserError):
    """The loss or the gradient norm stopped being a finite number."""
