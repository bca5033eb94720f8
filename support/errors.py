"""Bad input as one line, and stopping cleanly: the error type every file raises, and how every
command reports it and handles SIGTERM.

    from support.errors import UserError, run_main
    run_main(fn, *args)   # fn's UserError or OSError -> "error: ..." on stderr, exit 2

SIGTERM (what `kill`, cluster schedulers and `docker stop` send) is raised as `Terminated`, a kind of
KeyboardInterrupt, so every `with` block and `finally` cleans up as for Ctrl-C; the exit code is
then 143 (Ctrl-C: 130). train.py's loop catches both at a step boundary and saves first. SIGINT
is Ctrl-C's KeyboardInterrupt also in a command started in the background, which a shell starts
ignoring SIGINT: `kill -INT` stops it as Ctrl-C would, with exit code 130.
The line is one line whatever the message holds (a newline in a path is written \\n), starts on
a line of its own while a progress bar is on screen, and a path that is not UTF-8 prints as its
bytes (stdout and stderr take surrogate escapes) instead of failing the last print of a run.
Not run on its own. Read next: flags.py.
"""
import signal
import sys


class UserError(Exception):
    """Bad input from the user (a file, a flag): the commands print it as one line, exit 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds and cleans up as for Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated()


def run_main(fn, *args):
    """Call fn(*args) the way every command's main() does: a UserError or a failed read or write is
    one line on stderr and exit code 2, Ctrl-C exit code 130, SIGTERM 143; no traceback for any."""
    signal.signal(signal.SIGTERM, raise_terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started ignoring it (`nohup cmd &`)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file size limit: an OSError (EFBIG), not a kill
    for stream in (sys.stdout, sys.stderr):  # a path of bytes that are not UTF-8 prints as those bytes
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") == "utf8":
            stream.reconfigure(errors="surrogateescape")
    try:
        return fn(*args)
    except UserError as e:
        say(f"error: {e}")
    except OSError as e:  # permission denied, read-only file system, disk full, file too large, ...
        say(f"error: {e.filename or 'a file'}: {e.strerror or e}")
    except Terminated:
        say("terminated (SIGTERM)")
        sys.exit(143)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    sys.exit(2)


def say(line: str):
    """One line on stderr, whatever the message holds (a path with a newline in it), on a line of its
    own even while a progress bar is on screen (each open bar is closed first: it ends its line)."""
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(bars, "_instances", ())):
        bar.close()
    print(line.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr, flush=True)
