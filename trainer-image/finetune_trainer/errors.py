"""Errors the user can fix. The CLI prints them as one line and exits with the error's
`exit_code` (EXIT_USER_ERROR unless a subclass says otherwise)."""

from finetune_trainer.protocol import EXIT_DESTINATION_IN_USE, EXIT_USER_ERROR


class UserError(Exception):
    """A problem in the job's config or data, not in the trainer. Never shown with a traceback."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class DestinationInUse(ConfigError):
    """output.dir is owned by another job (or holds files no job claimed): nothing was written."""

    exit_code = EXIT_DESTINATION_IN_USE


class TrainingDiverged(UserError):
    """The loss or the gradient norm stopped being a finite number."""
