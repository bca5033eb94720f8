"""Writing outputs without losing the user's files: the one check that an output may be written
(before any work), atomic writes, and directories put in place only when complete.

    check_output_file("out.pt", inputs=[data, model_dir])   # refuses an input, a directory, ...
    atomic_save(obj, "out.pt")                               # never half-written
    with new_directory("checkpoints/m", force) as tmp: ...   # renamed into place at the end

Not run on its own. Read next: checkpoint.py.
"""
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from support.errors import UserError


def same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_writable(out: Path):
    """The nearest existing folder above `out` is a folder we may write in."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: {parent} is a file, not a folder")
    try:  # a real write, not a permission bit: read-only file systems and /proc answer only to that
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UserError(f"cannot write {out}: {parent} is not writable ({e.strerror})") from None


def check_output_file(out, inputs=(), sibling_suffix=None, model=None):
    """Refuse, before any work, an output file that is a directory, that is (or resolves to) one
    of the run's inputs (a file, or any file in the `model` directory), or whose sibling (the
    metrics file) is one. Removes temporary files that a killed run left beside it."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a directory; name a file for the output, e.g. {out / 'aligner.pt'}")
    sources = [Path(i) for i in inputs if i] + (list(Path(model).glob("*")) if model else [])
    for target in [out] + ([out.with_suffix(sibling_suffix)] if sibling_suffix else []):
        for source in sources:
            if same_file(target, source):
                raise UserError(f"writing {target} would overwrite {source}, an input of this run; "
                                f"choose another output name")
    check_writable(out)
    for stale in out.parent.glob(f".{out.name}.*.tmp") if out.parent.is_dir() else []:
        stale.unlink()


def check_output_dir(out, sources=(), force=False):
    """Refuse an output directory that is the current directory or above it, a source of this run
    or above one, a file, or an existing directory that --force may not replace: --force replaces
    only a directory this project wrote (one with params.json or config.json)."""
    out, here = Path(out), Path.cwd().resolve()
    where = out.resolve()
    if where == here or where in here.parents:
        raise UserError(f"{out} is the current directory or one above it; name a new directory")
    for source in map(Path, sources):
        if where == source.resolve() or where in source.resolve().parents:
            raise UserError(f"{out} is where the input {source} lies; name a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out} exists and is not empty; pass --force to replace it")
        if not ((out / "params.json").is_file() or (out / "config.json").is_file()):
            raise UserError(f"{out} is not a model directory (no params.json or config.json): --force "
                            f"replaces only those; name a new directory")
    check_writable(out)


@contextmanager
def new_directory(out, force=False, sources=()):
    """A fresh temporary directory beside `out` for the block to fill; renamed to `out` when the
    block ends without an error, so a failure never leaves a half-written `out` behind."""
    check_output_dir(out, sources, force)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the result should be like any other directory
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        tmp.mkdir()  # for TemporaryDirectory's own cleanup


def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, then rename: `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666  # as open() would: umask applies
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def write_jsonl(path, rows):
    """Rows as JSON lines, atomically."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


class JsonLines:
    """A file of one JSON object per line, appended to as rows come (path None: nowhere). A fresh
    one is started, emptying an old file, only when the writer is created, after the checks."""

    def __init__(self, path, fresh: bool):
        self.path = path
        if path and fresh:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("")

    def write(self, row: dict):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
