"""User-facing errors: the CLI prints these as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input from the user or a bad file: the message alone tells what is wrong and what to do."""
