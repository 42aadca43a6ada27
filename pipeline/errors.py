"""The one exception type a user sees."""


class PipelineError(Exception):
    """Bad input: wrong params, missing or corrupt files, mismatched checkpoints.

    The message is one line that names the problem and what is allowed.
    """
