"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a one-line message on stderr and exit code 2 (no traceback);
everything else is a bug and keeps its traceback.
"""

import difflib


class UserError(Exception):
    """Bad input: a config key, a file, a name. The message is shown as is."""


def from_worker(e: UserError) -> UserError:
    """A UserError raised in a DataLoader worker, which re-raises it wrapped in the worker's
    traceback: the one line of the original."""
    return UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1])


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
