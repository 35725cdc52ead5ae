"""One exception type for every user-facing problem.

Anything the user can get wrong (a model folder, a config field, a tensor, a CLI value) raises
`MinidiffError` with a one-line message that names the problem. The CLI prints that line and exits
non-zero; it never shows a traceback for these.
"""


class MinidiffError(Exception):
    """A problem with the user's input: printed as one line by the CLI, exit status 2."""
