"""User-facing errors: each one is a single line naming the file or key and what was expected."""


class MerganserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class RecipeError(MerganserError):
    """The recipe is malformed or asks for something impossible."""


class CheckpointError(MerganserError):
    """A checkpoint is missing, unreadable, inconsistent or unsafe."""
