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
an exact pattern over the folder's entries, never by a glob built from the user's name. A live
run's temporary also says "being written": a second run on the same output is refused. A write that
fails (disk full, file size limit, read-only) is one line, and the old file stays as it was.
Not run on its own. Read next: outputs.py.
"""
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path

from support.errors import UserError

SUFFIX = ".aligner-tmp"
MARKER = ".aligner-output"  # in every directory this project writes; --force replaces only those


def usual_mode(directory=False) -> int:
    """The mode open() or mkdir() would give a new file or directory: 0o666 or 0o777 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def temporary_name(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}{SUFFIX}"


def canonical(target: Path) -> Path:
    """`target` in the folder its name means to the file system (links and `..` followed as open()
    follows them): two spellings of one output find the same temporaries."""
    return Path(os.path.realpath(Path(target).parent)) / Path(target).name


def lock(fd: int) -> bool:
    """Take the lock on an open file or directory; False if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def temporaries(target: Path):
    """(entry, process id) of each temporary of `target` (a file or directory), by the exact pattern."""
    pattern = re.escape(f".{target.name}.") + r"(\d+)\.[0-9a-f]{16}" + re.escape(SUFFIX)
    folder = target.parent if target.parent.is_dir() else None
    for entry in os.scandir(folder) if folder else []:
        match = re.fullmatch(pattern, entry.name)
        if match and (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            yield entry, int(match.group(1))


def remove_leftovers(target: Path):
    """Remove the temporaries of `target` whose runs are certainly gone (see the docstring above)."""
    for entry, pid in temporaries(target):
        if process_alive(pid):
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


def other_writer(target: Path):
    """The process id of another live run that holds a temporary (file or directory) of `target`
    (it is writing it), or None."""
    for entry, pid in temporaries(target):
        if pid == os.getpid():
            continue
        fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            free = lock(fd)
        finally:
            os.close(fd)  # a lock this took is released with it
        if not free and process_alive(pid):
            return pid
    return None


def refuse_shared(target: Path):
    """One run writes a file at a time: a second run on the same output would mix the two."""
    pid = other_writer(canonical(target))
    if pid:
        raise UserError(f"{target} is being written by another run (process {pid}); wait for it to end, "
                        f"stop it, or name another output")


def refuse_non_file(path: Path):
    """The write itself passes the output gate's first rule: only a regular file is ever replaced."""
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise UserError(f"{path} exists and is not a regular file (a device, FIFO, link or folder): "
                        f"it is not replaced; name a file for the output")


def write_failed(path, error: OSError) -> UserError:
    """A failed write as one line: what failed, why, and that the old file is untouched."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied"}.get(error.errno, error.strerror or str(error))
    return UserError(f"cannot write {path}: {why}; {path} is as it was before this run")


def new_folders(target: Path) -> list:
    """The folders on the way to `target` that were not there, made now; returns those this call
    made, deepest first (a name like a/../b that turns out to be a folder already there is not)."""
    made = []
    for folder in reversed([p for p in target.parents if not p.is_dir()]):  # the outermost first
        try:
            folder.mkdir()
            made.insert(0, folder)
        except OSError as e:
            if not folder.is_dir():  # a file or a dangling link in the way, a read-only file system
                remove_if_empty(made)
                raise UserError(f"cannot write {target}: {folder} cannot be made a folder ({e.strerror}); "
                                f"name another path") from None
    return made


def remove_if_empty(folders: list):
    """`folders` (deepest first) removed while each is empty: a run that stopped before writing its
    file leaves no folders it made behind it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: what is in it stays, and the folders above it
            return


@contextmanager
def held_file(target: Path):
    """(fd, path) of a new locked temporary file beside `target`, removed when the block ends with
    the folders made for it if nothing else is in them; refused while another live run holds one
    (it is writing the same file)."""
    made = new_folders(target)
    try:
        refuse_shared(target)
        tmp = temporary_name(target)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, usual_mode())
        lock(fd)
        try:
            yield fd, tmp
        finally:
            os.close(fd)
            if tmp.exists():
                tmp.unlink()
    finally:
        remove_if_empty(made)


def atomic_write(path, write):
    """write(file) into a temporary beside `path`, then one rename: `path` is never half-written and
    keeps its mode when it existed (a new one gets the usual mode)."""
    path = Path(path)
    refuse_non_file(path)
    mode = path.stat().st_mode & 0o777 if path.is_file() else usual_mode()
    with held_file(path) as (fd, tmp):
        f = Recording(open(os.dup(fd), "wb"))
        try:
            with f.file:
                write(f)
                f.file.flush()
                os.fsync(f.file.fileno())
        except OSError as e:
            raise write_failed(path, e) from None
        except RuntimeError:  # torch.save turns the writer's OSError into a RuntimeError: the cause is kept
            if f.error is None:
                raise
            raise write_failed(path, f.error) from None
        os.chmod(tmp, mode)
        refuse_non_file(path)
        os.replace(tmp, path)


class Recording:
    """A binary file that remembers the first OSError of a write (a writer may report it otherwise)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def atomic_save(obj, path):
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def write_jsonl(path, rows):
    """Rows as JSON lines, atomically."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def write_marker(folder: Path, source, files: list):
    """The marker that says this project wrote `folder`, with the files it wrote there (all that
    --force may remove)."""
    record = {"written_by": "aligner", "source": str(source), "files": files}
    (folder / MARKER).write_text(json.dumps(record) + "\n")


def foreign_files(folder: Path) -> list:
    """What in `folder` its marker does not list (all of it, without a readable marker): files, links,
    and folders that hold none of the listed files; Python's compiled files in __pycache__ aside. What
    --force and a replacement never remove."""
    ours = written_files(folder) or set()
    above = {str(p) for name in ours for p in Path(name).parents}  # the folders of the listed files
    found = []
    for f in sorted(folder.rglob("*")):
        name = str(f.relative_to(folder))
        if f.is_dir() and not f.is_symlink():
            found += [] if name in above or f.name == "__pycache__" else [name]
        elif not (name in ours or name == MARKER or f.parent.name == "__pycache__" and f.suffix == ".pyc"):
            found.append(name)
    return found


def written_files(folder: Path):
    """The files the marker in `folder` says this project wrote there; None without a readable marker."""
    try:
        files = json.loads((folder / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


@contextmanager
def added_folder(out: Path, source, files: list):
    """A folder that a run adds to (the experiment's results, which resume): made with this
    project's marker listing `files` when new, and held (a lock on the marker) while the block runs,
    so that a second run adding to it at the same time is refused."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        write_marker(out, source, files)
    fd = os.open(out / MARKER, os.O_RDONLY)
    try:
        if not lock(fd):
            raise UserError(f"{out} is in use by another run; wait for it to end, or name another folder")
        yield out
    finally:
        os.close(fd)


@contextmanager
def writes_into(tmp: Path, out: Path):
    """A failed write into `tmp` (the directory that becomes `out`) as one line: an OSError there, or
    a writer's own error that carries one (safetensors: "... (os error 28)"). Failed reads pass."""
    try:
        yield
    except OSError as e:
        if e.filename and not str(e.filename).startswith(str(tmp)):
            raise
        raise write_failed(out, e) from None
    except UserError:
        raise
    except Exception as e:
        code = re.search(r"os error (\d+)\)", str(e))
        if code is None:
            raise
        raise write_failed(out, OSError(int(code.group(1)), os.strerror(int(code.group(1))))) from None


@contextmanager
def new_directory(out: Path, source: str):
    """A locked temporary directory beside `out` for the block to fill; when the block ends without
    an error its files get the usual modes, a marker saying this project wrote it (from `source`),
    and it is put in place as `out` (`put_in_place`)."""
    out = Path(out)
    made, tmp = new_folders(out), temporary_name(out)
    tmp.mkdir(mode=0o700)
    fd = os.open(tmp, os.O_RDONLY)
    lock(fd)
    try:
        with writes_into(tmp, out):
            yield tmp
            files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if not f.is_dir())
            write_marker(tmp, source, files)
        for f in tmp.rglob("*"):
            f.chmod(usual_mode(f.is_dir()))
        tmp.chmod(usual_mode(directory=True))
        put_in_place(tmp, out)
    finally:
        os.close(fd)
        if tmp.exists():
            shutil.rmtree(tmp)
        remove_if_empty(made)


def put_in_place(tmp: Path, out: Path):
    """The finished directory `tmp` renamed to `out`. An `out` already there (the gate allowed it:
    empty, or only files this project wrote) is looked at again, since a file may have been put in it
    while the run worked (then nothing is replaced: one line); it is renamed aside and removed once
    `tmp` is in its place, with Ctrl-C and SIGTERM held meanwhile, so that `out` is always one of the
    two, whole. Left open: a file written into `out` in the microseconds between that look and the
    rename, and SIGKILL between the two renames (the old one is then the temporary beside `out`)."""
    aside = temporary_name(out) if os.path.lexists(out) else None
    if aside and not stat.S_ISDIR(os.lstat(out).st_mode):
        raise UserError(f"{out} is now {'a link' if out.is_symlink() else 'a file'}, put there while this "
                        f"run worked: nothing is replaced; move it and run again, or name a new directory")
    for name in foreign_files(out)[:1] if aside else []:
        raise UserError(f"{out} now holds {name}, put there while this run worked: "
                        f"nothing is replaced; move it out and run again, or name a new directory")
    with signals_held():
        if aside:
            os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except OSError:
            if aside:
                os.rename(aside, out)
            raise
        if aside:
            shutil.rmtree(aside)


@contextmanager
def signals_held():
    """Ctrl-C and SIGTERM that arrive while the block runs take effect when it ends (Python runs
    signal handlers in the main thread only, so elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, _: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in caught:
            signal.raise_signal(signum)


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
