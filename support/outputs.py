"""The one gate every output passes before any work: a path may be written only if what is there
(if anything) is a regular file or a directory this project wrote, and it is none of the run's
inputs, the implicit ones included (the base model an adapter names, its tokenizer).

    check_output_file("out.pt", inputs=[data, init, *adapters], input_dirs=[model_dir])
    check_output_dir("checkpoints/m", sources=[src], force=False)

Refused, each with one line: a name ending in "/" (a directory, not a file), a symbolic link (the
write would land elsewhere), an existing directory, FIFO, socket or device, any path that is (or
resolves to) an input or a file of an input directory, a folder that cannot be written. A
directory output is never the current directory or above it, nor a source or above one, and
--force replaces only a directory that holds this project's marker (support/temporary.py) and
no file but those the marker lists. A file that another live run is writing is refused, and so is
a name too long for the temporary that the write puts beside it.
Not run on its own. Read next: checkpoint.py.
"""
import os
import stat
import tempfile
from pathlib import Path

from support.errors import UserError
from support.temporary import (MARKER, SUFFIX, canonical, foreign_files, refuse_shared, remove_leftovers,
                               temporary_name, written_files)


def kind(path: Path) -> str:
    """What a path that exists is, in words."""
    mode = path.lstat().st_mode
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a file"


def same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)  # a link loop on the way stays as it is named


def check_writable(out: Path):
    """The nearest existing folder above `out`, followed as open() follows the name (a file or a
    dangling or looping link on the way is met as such), is a folder we may write in, and the name
    of the temporary that the write makes beside `out` fits this file system."""
    parent = out.parent
    while not (parent.exists() or parent.is_symlink()) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        what = f"{kind(parent)} to {os.readlink(parent)}" if parent.is_symlink() else kind(parent)
        raise UserError(f"cannot write {out}: {parent} is {what}, not a folder")
    try:  # a real write, not a permission bit: read-only file systems and /proc answer only to that
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UserError(f"cannot write {out}: {parent} is not writable ({e.strerror})") from None
    longest = max(len(os.fsencode(part)) for part in temporary_name(Path(os.path.abspath(out))).parts)
    if longest > os.pathconf(parent, "PC_NAME_MAX"):
        raise UserError(f"cannot write {out}: a name in it is too long for this file system "
                        f"({os.pathconf(parent, 'PC_NAME_MAX')} bytes at most, with room for "
                        f"the temporary's {len(SUFFIX) + 30} more); choose a shorter name")


def check_output_file(out, inputs=(), input_dirs=()):
    """Refuse, before any work, an output file that could cost the user a file (see above); then
    remove the leftovers of dead runs that wrote it."""
    text, out = str(out), Path(out)
    if os.path.basename(text) in ("", ".", ".."):  # DIR/, DIR/. and DIR/.. (pathlib drops a trailing /.)
        raise UserError(f"{text} names a directory; name a file for the output, e.g. {out / 'aligner.pt'}")
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link (to {os.readlink(out)}); name a file, not a link")
    if out.exists() and not out.is_file():
        raise UserError(f"{out} is {kind(out)}, not a regular file; name a file for the output")
    dirs = [Path(d) for d in input_dirs if isinstance(d, (str, Path)) and Path(d).is_dir()]
    sources = [Path(i) for i in inputs if i] + [f for d in dirs for f in d.iterdir()]
    for source in sources:
        if same_file(out, source):
            raise UserError(f"writing {out} would overwrite {source}, an input of this run; "
                            f"choose another output name")
    check_writable(out)
    refuse_shared(out)
    remove_leftovers(canonical(out))


def check_outputs(outs, inputs, base):
    """check_output_file for each of a command's output files, against its input files and the files
    of its base model's directory (None: the embedded default model's)."""
    from support.default_model import DEFAULT_MODEL_DIR

    for out in outs:
        check_output_file(out, inputs, [base or DEFAULT_MODEL_DIR])


def check_output_dir(out, sources=(), force=False, add=False):
    """Refuse an output directory that is the current directory or above it, a source of this run
    or above one, anything but a directory, or one that --force may not replace. With `add` (a run
    that adds to its folder, as the experiment resumes), a folder that holds files needs no --force,
    only the marker."""
    text, out, here = str(out), Path(out), Path.cwd().resolve()
    where = Path(os.path.realpath(out))  # as same_file: a link loop on the way stays as it is named
    if where == here or where in here.parents:
        raise UserError(f"{out} is the current directory or one above it; name a new directory")
    for source in map(Path, sources):
        real = Path(os.path.realpath(source))
        if where == real or where in real.parents:
            raise UserError(f"{out} is where the input {source} lies; name a new directory")
    if os.path.basename(text.rstrip("/")) == "..":  # DIR/..: its temporary would land inside DIR
        raise UserError(f"{out} ends in ..; name the directory itself")
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise UserError(f"{out} is {kind(out)}, not a directory; name a new directory")
    if out.is_dir() and any(out.iterdir()):
        check_replaceable(out, force, add)
    check_writable(out)
    refuse_shared(out)
    remove_leftovers(canonical(out))


def check_replaceable(out: Path, force: bool, add: bool):
    """A directory that holds files: replaced only with --force, added to only with `add`, and
    either only when this project made it."""
    if not force and not add:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it")
    if not (out / MARKER).is_file():
        raise UserError(f"{out} was not written by this project (it has no {MARKER} marker): "
                        f"{'it is not added to' if add else '--force replaces only those'}; "
                        f"remove it yourself or name a new directory")
    if force:
        check_only_ours(out)


def check_only_ours(out: Path):
    """--force removes a directory only when every file in it is one its marker lists (caches that
    Python regenerates, __pycache__, aside): a file the user put there is never removed."""
    if written_files(out) is None:
        raise UserError(f"{out}: its {MARKER} marker lists no files (an older version wrote it): --force "
                        f"cannot tell its files from yours; remove it yourself or name a new directory")
    for name in foreign_files(out)[:1]:
        raise UserError(f"{out} holds {name}, which this project did not write: --force removes only "
                        f"what it wrote; move that file out, or name a new directory")
