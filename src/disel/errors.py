"""The one exception type for bad user input: its message is a single sentence naming the bad value and the fix."""


class UserError(ValueError):
    """Bad input from a user (config value, path, file content). The CLI prints it and exits non-zero."""
