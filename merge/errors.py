"""User-facing errors: one line that names the file or tensor and says how to fix it."""


class MergeError(Exception):
    """A problem with the user's input or environment. The CLI prints it on one line and exits 2."""

    exit_code = 2


class InputError(MergeError):
    """A checkpoint, index or recipe is missing, malformed or incompatible."""


class OutputExistsError(MergeError):
    """The output folder exists and is not empty, and --force was not given."""
