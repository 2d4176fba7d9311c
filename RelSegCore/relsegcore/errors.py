"""Errors a user can act on.

Every problem caused by the input, the model file or the environment is raised as a
``RelSegError`` subclass with one sentence naming the problem; the CLI prints that
sentence and exits with status 2, without a traceback.
"""


class RelSegError(Exception):
    """Base class: a problem the user can fix, reported as one clear message."""


class InputError(RelSegError):
    """The input image, folder or file is not something we can segment."""


class ModelError(RelSegError):
    """A model file is missing, corrupt, or does not match its model card."""


class Cancelled(RelSegError):
    """The user cancelled a long-running job."""
