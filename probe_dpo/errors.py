"""The one exception type for bad user input.

A ``UserError`` carries a single line that names what is wrong and where (file, key,
column, layer, URI). The CLI prints it without a traceback and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a data file, a path, a layer, a bucket."""
