"""Reading files that come from strangers: weights (never code), JSON, and text, each failure one line.

    d = load_weights("out.pt")          # torch.load(weights_only=True): a file with code is refused
    cfg = read_json_object("params.json")
    records = read_json("alpaca.jsonl")  # a .jsonl file: the list of its lines' values
    records = read_records("alpaca.json", ("instruction", "output"))  # dicts of strings, checked

Not run on its own. Read next: outputs.py.
"""
import io
import itertools
import json
import os
import sys
from pathlib import Path

import torch

from support.errors import UserError


def existing_file(path, what="file") -> Path:
    """`path` as a Path, when it names something to read: a file, or a stream such as /dev/stdin,
    a pipe or a shell's <(...) (not a directory)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the {what} itself")
    if not path.exists():
        raise UserError(f"{path} not found")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path} cannot be read (permission denied)")
    return path


def seekable(path: Path):
    """`path` itself when it is a regular file, else its bytes (a stream is read once, into memory)."""
    return path if path.is_file() else io.BytesIO(path.read_bytes())


def load_weights(path, what="adapter file", mmap=False) -> dict:
    """The dict of tensors in a PyTorch file, read with weights_only=True (adapter files and
    checkpoints come from strangers); anything else is one UserError."""
    path = existing_file(path, what)
    try:
        d = torch.load(seekable(path), map_location="cpu", weights_only=True, mmap=mmap and path.is_file())
    except Exception as e:  # truncated zip, a text file, a pickle with code in it: all refused alike
        raise UserError(f"{path}: cannot be read as PyTorch weights ({type(e).__name__}): not a "
                        f".pt/.pth file, truncated, or holding code that weights_only refuses") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: holds a {type(d).__name__}, not a dict of tensors")
    return d


def read_json_object(path) -> dict:
    """The JSON object in a file, or a UserError naming the file."""
    try:
        d = json.loads(existing_file(path).read_bytes())
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def read_text(path) -> str:
    path = existing_file(path, "data file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def read_json(path):
    """The JSON value in `path` (a list of the lines' values for .jsonl), or a UserError that says
    where the problem is."""
    path, text = Path(path), read_text(path)
    lines = enumerate(text.splitlines(), 1) if path.suffix == ".jsonl" else [(None, text)]
    values = []
    for n, line in lines:
        try:
            values += [json.loads(line)] if line.strip() or n is None else []
        except json.JSONDecodeError as e:
            where = f"line {n}, column {e.colno}" if n else f"line {e.lineno}, column {e.colno}"
            raise UserError(f"{path}: invalid JSON on {where}: {e.msg}") from None
        except RecursionError:
            raise UserError(f"{path}: the JSON is nested too deeply to be records") from None
    return values if path.suffix == ".jsonl" else values[0]


def valid_text(text: str) -> bool:
    """True unless the string holds a lone surrogate, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def text_lines(path) -> list:
    """The non-empty lines of a UTF-8 text file, stripped; at least one."""
    lines = [line.strip() for line in read_text(path).splitlines()]
    if not any(lines) or not all(map(valid_text, lines)):
        raise UserError(f"{path}: no prompts, or a line that is not valid text")
    return [line for line in lines if line]


def stdin_lines(prompt=None):
    """The lines of standard input, one prompt each (`prompt` shown on stderr before each read); a
    line that is not UTF-8 is refused."""
    if sys.stdin is None:
        raise UserError("standard input is closed and no --prompt or --data was given: nothing to answer")
    for n in itertools.count(1):
        if prompt:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.buffer.readline()
        if not line:
            return
        try:
            yield line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UserError(f"standard input, line {n}: not UTF-8 text") from None


def prompt_lines(given=None):
    """The prompts to answer one at a time: those given (--prompt), else the lines of standard input,
    one a line; blank ones skipped, one that is not valid text refused."""
    for text in filter(str.strip, given or stdin_lines()):
        if not valid_text(text):
            raise UserError("a prompt is not valid UTF-8 text")
        yield text


def prompt_records(path: Path, fields) -> list:
    """The lines of a .txt file of prompts, each an {"instruction": line}."""
    if tuple(fields) != ("instruction",):
        raise UserError(f"{path}: a .txt file holds prompts only, one a line; give records with "
                        f"{', '.join(fields)} as JSON or JSONL")
    return [{"instruction": line} for line in text_lines(path)]


def read_records(path, fields, optional=("input",)) -> list:
    """A non-empty list of dicts whose `fields` (and `optional` fields, where present) are strings; a .txt
    file is a list of prompts, its non-empty lines, each an {"instruction": line}."""
    path = Path(path)
    records = prompt_records(path, fields) if path.suffix == ".txt" else read_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a list of records, found a {type(records).__name__}")
    if not records:
        raise UserError(f"{path}: no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record {i} is a {type(r).__name__}, not an object")
        for f in fields + tuple(optional):
            if f not in r and f not in optional:
                raise UserError(f"{path}: record {i} has no {f!r} field")
            if f in r and not isinstance(r[f], str):
                raise UserError(f"{path}: record {i}: field {f!r} is a {type(r[f]).__name__}, not a string")
            if f in r and not r[f].isascii() and not valid_text(r[f]):
                raise UserError(f"{path}: record {i}: field {f!r} holds a character that is not valid "
                                f"text (a lone UTF-16 surrogate, as '\\ud800' writes it)")
    return records
