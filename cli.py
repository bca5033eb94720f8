"""What every command line here shares: flags declared once as config fields, the device and
dtype choice, writing a file atomically, and bad input reported as one line with exit code 2.

A config dataclass (train.TrainConfig, generate.GenerateConfig) declares each flag once, with
`flag(default, help, type)`; `parse_config` turns the command line into that dataclass, so
argparse never travels further than `main()`. Not run on its own.
Read next: convert_weights.py (skim), then aligner.py.
"""
import argparse
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import MISSING, field, fields
from pathlib import Path

import torch

from model import UserError


def flag(default, help: str, type=None, **argparse_options):
    """A config field that is also a command-line flag: its default, its --help text, and the
    argparse `type` that converts (and checks) the string. A bool field becomes a switch."""
    return field(default=default, metadata={"help": help, "type": type, **argparse_options})


def parse_config(cls, argv, doc: str):
    """The dataclass `cls` from the command line; --help lists its fields as --flags."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
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


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename: `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextmanager
def new_directory(out, force=False):
    """A fresh temporary directory beside `out` for the block to fill; renamed to `out` when the
    block ends without an error, so a failure never leaves a half-written `out` behind."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the result should be like any other directory
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        tmp.mkdir()  # for TemporaryDirectory's own cleanup


def run_main(fn, *args):
    """Call fn(*args) the way every script's main() does: a UserError is one line on stderr and
    exit code 2, Ctrl-C is exit code 130; no traceback for either."""
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
