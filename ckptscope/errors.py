"""The one exception type users see for bad input."""


class CkptscopeError(ValueError):
    """Bad input: a file, a name, a pair or an option that ckptscope cannot use.

    The message is one line that names the problem and the next step. The CLI prints it without
    a traceback and exits with status 2.
    """
