class UserError(Exception):
    """A problem with what the user gave us (a path, a file, a flag). Scripts print it as one line and exit 2."""
