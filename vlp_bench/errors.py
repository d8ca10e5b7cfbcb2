"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a one-line message on stderr and exit code 2 (no traceback);
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config key, a file, a name. The message is shown as is."""
