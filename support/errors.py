"""Bad input as one line: the error type every file raises, and how every command reports it.

    from support.errors import UserError, run_main
    run_main(fn, *args)   # fn's UserError or OSError -> "error: ..." on stderr, exit 2

Not run on its own. Read next: flags.py.
"""
import sys


class UserError(Exception):
    """Bad input from the user (a file, a flag): the commands print it as one line, exit 2."""


def run_main(fn, *args):
    """Call fn(*args) the way every command's main() does: a UserError or a failed read or write is
    one line on stderr and exit code 2, Ctrl-C is exit code 130; no traceback for any of them."""
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # permission denied, read-only file system, disk full, ...
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    sys.exit(2)
