"""Temporary files and directories that belong to the run that made them, and the writes built on
them: a file is never half-written, a directory appears only when complete, metrics move only with
the adapter they describe.

    atomic_write("out.pt", lambda f: f.write(data))    # a temporary beside it, then one rename
    with new_directory("checkpoints/m") as tmp: ...     # filled, checked, then renamed into place
    with StagedLines("out.metrics.jsonl", keep=False) as m: m.write(row); m.publish()

A temporary is named `.NAME.PID.RANDOM.aligner-tmp`, beside its target: no other run makes the same
name, and it ends in a suffix no user file has. Its run holds a lock on it (flock) while it lives,
and removes it on success, on an error, on Ctrl-C and on SIGTERM. A leftover of a run that was
killed outright (SIGKILL, power) is removed by a later run on the same target, and only once it is
certain the run is gone: its lock is free and its process no longer exists. Leftovers are found by
an exact pattern over the folder's entries, never by a glob built from the user's name.
Not run on its own. Read next: outputs.py.
"""
import fcntl
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

SUFFIX = ".aligner-tmp"
MARKER = ".aligner-output"  # in every directory this project writes; --force replaces only those


def usual_mode(directory=False) -> int:
    """The mode open() or mkdir() would give a new file or directory: 0o666 or 0o777 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def temporary_name(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}{SUFFIX}"


def lock(fd: int) -> bool:
    """Take the lock on an open file or directory; False if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_leftovers(target: Path):
    """Remove the temporaries of `target` whose runs are certainly gone (see the docstring above)."""
    pattern = re.escape(f".{target.name}.") + r"(\d+)\.[0-9a-f]{16}" + re.escape(SUFFIX)
    folder = target.parent if target.parent.is_dir() else None
    for entry in os.scandir(folder) if folder else []:
        match = re.fullmatch(pattern, entry.name)
        kind_ok = entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)
        if not match or not kind_ok or process_alive(int(match.group(1))):
            continue
        fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not lock(fd):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        finally:
            os.close(fd)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True


@contextmanager
def held_file(target: Path):
    """(fd, path) of a new locked temporary file beside `target`, removed when the block ends."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, usual_mode())
    lock(fd)
    try:
        yield fd, tmp
    finally:
        os.close(fd)
        if tmp.exists():
            tmp.unlink()


def atomic_write(path, write):
    """write(file) into a temporary beside `path`, then one rename: `path` is never half-written and
    keeps its mode when it existed (a new one gets the usual mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.is_file() else usual_mode()
    with held_file(path) as (fd, tmp):
        with open(os.dup(fd), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)


def atomic_save(obj, path):
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def write_jsonl(path, rows):
    """Rows as JSON lines, atomically."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


@contextmanager
def new_directory(out: Path, source: str):
    """A locked temporary directory beside `out` for the block to fill; when the block ends without
    an error its files get the usual modes, a marker saying this project wrote it (from `source`),
    and it is renamed to `out` (an old `out`, already allowed by the caller, is removed first)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(out)
    tmp.mkdir(mode=0o700)
    fd = os.open(tmp, os.O_RDONLY)
    lock(fd)
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "aligner", "source": str(source)}) + "\n")
        for f in tmp.rglob("*"):
            f.chmod(usual_mode(f.is_dir()))
        tmp.chmod(usual_mode(directory=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        os.close(fd)
        if tmp.exists():
            shutil.rmtree(tmp)


class StagedLines:
    """A JSON-lines file (the metrics) written beside its target while a run lives and put in place
    only by `publish()`, which the run calls right after saving the adapter those lines describe:
    a run that fails or is killed leaves the target as the last good run left it. With `keep`
    (--resume) the staged file starts as a copy of the target."""

    def __init__(self, path, keep: bool):
        self.path, self.keep = Path(path) if path else None, keep
        self.held = held_file(self.path) if self.path else None

    def __enter__(self):
        if self.held:
            self.fd, _ = self.held.__enter__()
            if self.keep and self.path.is_file():
                os.write(self.fd, self.path.read_bytes())
        return self

    def write(self, row: dict):
        if self.path:
            os.write(self.fd, (json.dumps(row) + "\n").encode())

    def publish(self):
        if self.path:
            os.lseek(self.fd, 0, os.SEEK_SET)
            with open(os.dup(self.fd), "rb") as f:
                data = f.read()
            atomic_write(self.path, lambda f: f.write(data))
            os.lseek(self.fd, 0, os.SEEK_END)

    def __exit__(self, *exc):
        if self.held:
            self.held.__exit__(*exc)
