"""What every command line here shares: flags declared once as config fields and checked where
they are parsed, the one place that decides whether an output may be written, atomic writes,
and bad input reported as one line with exit code 2.

A config dataclass (train.TrainConfig, generate.GenerateConfig) declares each flag once, with
`flag(default, help, type)`; `parse_config` turns the command line into that dataclass, so
argparse never travels further than `main()`. The `type` both converts the flag's text and
refuses impossible values (argparse reports those itself: usage line, "error: ...", exit 2);
`check_flags` runs the same checks on a config built in Python. Not run on its own.
Read next: convert_weights.py (skim), then aligner.py.
"""
import argparse
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch


class UserError(Exception):
    """Bad input from the user (a file, a flag): the scripts print it as one line, exit 2."""


# ---- flags ---------------------------------------------------------------------------------------
def flag(default, help: str, type=None, **argparse_options):
    """A config field that is also a command-line flag: its default, its --help text, and the
    argparse `type` that converts (and checks) the string. A bool field becomes a switch."""
    return field(default=default, metadata={"help": help, "type": type, **argparse_options})


def parse_config(cls, argv, doc: str):
    """The dataclass `cls` from the command line; --help lists its fields as --flags."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in sorted(fields(cls), key=lambda f: f.name not in cls.__annotations__):  # its own flags first
        options = dict(f.metadata)
        name = "--" + f.name.replace("_", "-")
        if f.default is False:
            p.add_argument(name, action="store_true", help=options["help"])
            continue
        if options["type"] is None:
            options.pop("type")
        if f.default is not MISSING and f.default is not None and "action" not in options:
            options["help"] += f" (default: {f.default})"
        p.add_argument(name, default=None if f.default is MISSING else f.default, **options)
    return cls(**vars(p.parse_args(argv)))


def check_flags(config):
    """Run every field's flag type and choices on its value, so that a config made in Python is
    refused where the same command line would be."""
    for f in fields(config):
        value, check, choices = getattr(config, f.name), f.metadata.get("type"), f.metadata.get("choices")
        try:
            if value is not None and check is not None:  # a repeatable flag is a list: check each
                value = [check(v) for v in value] if isinstance(value, list) else check(value)
                setattr(config, f.name, value)
            if value is not None and choices and value not in choices:
                raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {value!r}")
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise UserError(f"--{f.name.replace('_', '-')}: {e}") from None


def _number(text, kind, ok, what):
    try:
        value = kind(text)
    except (ValueError, TypeError, OverflowError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text) -> int:
    return _number(text, int, lambda v: v >= 1, "a whole number >= 1")


def count(text) -> int:
    return _number(text, int, lambda v: v >= 0, "a whole number >= 0")


def random_seed(text) -> int:
    return _number(text, int, lambda v: 0 <= v < 2**31, "a whole number from 0 to 2147483647")


def positive_float(text) -> float:
    return _number(text, float, lambda v: v > 0, "a finite number > 0")


def non_negative_float(text) -> float:
    return _number(text, float, lambda v: v >= 0, "a finite number >= 0")


def fraction(text) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1")


def probability(text) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "a number above 0 and at most 1")


def path_text(text) -> str:
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must name a file, got an empty string")
    return str(text)


def device_name(text) -> str:
    """'auto', or a torch device that this machine has."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:1, mps)") from None
    have = {"cpu": True, "mps": torch.backends.mps.is_available(),
            "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()}
    if not have.get(device.type, False):
        raise argparse.ArgumentTypeError(f"this machine has no {text} device; use auto or cpu")
    return text


QUANTIZE = ["none", "int8", "nf4"]  # the frozen base's precision (convert_weights.quantize_base)


@dataclass
class Runtime:
    """Where and how the frozen base runs: the flags train.py's and generate.py's configs share."""
    device: str = flag("auto", "auto (cuda, then mps, then cpu), or a torch device", device_name)
    dtype: str = flag("auto", "base model dtype; auto: bfloat16 on cuda, float32 elsewhere",
                      choices=["auto", "float32", "bfloat16", "float16"])
    attention: str = flag("sdpa", "sdpa (fused, faster) or einsum (model.py's own lines): the same numbers",
                          choices=["sdpa", "einsum"])
    quantize: str = flag("none", "the frozen layers in 8 or 4 bits (needs torchao)", choices=QUANTIZE)
    compile: bool = flag(False, "torch.compile the model (decoding on CUDA: with CUDA graphs)")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        name = "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---- outputs: checked before any work, written atomically -----------------------------------------
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


def check_output_file(out, inputs=(), sibling_suffix=None):
    """Refuse, before any work, an output file that is a directory, that is (or resolves to) one
    of the run's input files, or whose sibling (the metrics file) is one. Removes temporary files
    that a killed run left beside it."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a directory; name a file for the output, e.g. {out / 'aligner.pt'}")
    for target in [out] + ([out.with_suffix(sibling_suffix)] if sibling_suffix else []):
        for source in [Path(i) for i in inputs if i]:
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


def run_main(fn, *args):
    """Call fn(*args) the way every script's main() does: a UserError or a failed read or write is
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
