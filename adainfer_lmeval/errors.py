"""The one exception type for user mistakes: its message is a single line naming the fix."""


class AdaInferError(ValueError):
    """Bad input from the user (model args, policy files, missing data or weights)."""
