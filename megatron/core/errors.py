"""User-facing errors.

A `UserError` is a mistake the user can fix (a missing file, a wrong flag, an impossible shape). Entry
points catch it and print its message as one line, exit non-zero, and never show a traceback. Internal
invariants use `assert` instead.
"""


class UserError(Exception):
    """Bad input from the user; the message names the problem and the fix in one line."""
