"""Instruction data: the tokenizer, the Alpaca template, records read with exact errors, token
ids with labels, and padded batches.

    tok = Tokenizer("checkpoints/smollm2-135m-instruct")     # text <-> ids
    records = read_records("alpaca.json", ("instruction", "output"))
    data = load_examples("alpaca.json", tok, max_len=512)   # DataSet(examples, truncated, dropped)
    batch = collate(data.examples[:8], tok.eos_id, "cpu")     # Batch(ids (B, T), labels (B, T))

A record is {"instruction", "input" (optional), "output"}; its Example is the ids of
BOS + prompt + response + EOS with labels that are IGNORE on the prompt (unless full_text), so
the loss is on the response only. Read next: generate.py (decoding), then train.py.
"""
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from cli import UserError
from convert_weights import read_json_object

IGNORE = -100  # label of a token that the loss skips (prompt and padding)

# The Alpaca template, exactly as the official Aligner code and Stanford Alpaca write it.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def format_prompt(instruction: str, input: str = "", template="alpaca") -> str:
    if template != "alpaca":
        return instruction + (f"\n{input}" if input else "")
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


class Tokenizer:
    """encode/decode for a converted model directory: sentencepiece (tokenizer.model) or the
    `tokenizers` library (tokenizer.json), plus tokenizer_config.json with bos_id, eos_id, add_bos."""

    def __init__(self, path):
        path = Path(path)
        config = path / "tokenizer_config.json"
        if not config.is_file():
            raise UserError(f"{config} not found: this model directory has no tokenizer; convert "
                            f"a checkpoint that includes one with convert_weights.py")
        cfg = read_json_object(config)
        self.bos_id, self.eos_id, self.add_bos = cfg.get("bos_id"), cfg.get("eos_id"), cfg.get("add_bos")
        if not all(i is None or type(i) is int and i >= 0 for i in (self.bos_id, self.eos_id)) or \
                type(self.add_bos) is not bool:
            raise UserError(f"{config}: bos_id and eos_id must be token ids (or null), add_bos true or false")
        try:
            self._encode, self._decode = self.backend(path)
        except Exception as e:  # both libraries raise plain exceptions on a damaged file
            raise UserError(f"{path}: the tokenizer cannot be read ({type(e).__name__}: {str(e)[:80]}); "
                            f"convert the checkpoint again") from None

    @staticmethod
    def backend(path: Path):
        """(encode, decode) of the tokenizer file in `path`."""
        if (path / "tokenizer.model").is_file():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            return sp.encode, sp.decode
        if (path / "tokenizer.json").is_file():
            import tokenizers

            tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            return (lambda text: tk.encode(text, add_special_tokens=False).ids,
                    lambda ids: tk.decode(ids, skip_special_tokens=False))
        raise UserError(f"{path}: neither tokenizer.model nor tokenizer.json is there")

    def encode(self, text: str, bos=None, eos=False) -> list:
        bos = self.add_bos if bos is None else bos
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self._decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    @property
    def pad_id(self) -> int:
        """The id that fills a batch's short rows: EOS where the tokenizer has one (never a label)."""
        return self.eos_id if self.eos_id is not None else 0


class Prompt(NamedTuple):
    instruction: str
    input: str = ""


def read_prompts(path) -> list:
    """The Prompts of a file to answer: instruction records (JSON or JSONL), or a .txt file with one
    instruction per line."""
    path = Path(path)
    if path.suffix != ".txt":
        return [Prompt(r["instruction"], r.get("input", "")) for r in read_records(path, ("instruction",))]
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        lines = [line.strip() for line in path.read_bytes().decode("utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = [Prompt(line) for line in lines if line]
    if not prompts or not all(map(valid_text, lines)):
        raise UserError(f"{path}: no prompts, or a line that is not valid text")
    return prompts


def stdin_lines():
    """The lines of standard input, one prompt each; a line that is not UTF-8 is refused."""
    for n, line in enumerate(sys.stdin.buffer, 1):
        try:
            yield line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UserError(f"standard input, line {n}: not UTF-8 text") from None


class Example(NamedTuple):
    ids: list  # BOS + prompt + response + EOS, truncated
    labels: list  # the ids, IGNORE where the loss skips
    prompt: str  # the prompt text, for sample answers


class DataSet(NamedTuple):
    examples: list
    truncated: int  # examples cut at max_len
    dropped: int  # examples with no response token left after the cut


class Batch(NamedTuple):
    ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)


def parse_json(path: Path):
    """The JSON value in `path` (a list of the lines' values for .jsonl), or a UserError that says
    where the problem is."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the data file itself")
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
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


def read_records(path, fields, optional=("input",)) -> list:
    """A non-empty list of dicts whose `fields` (and `optional` fields, where present) are strings."""
    path = Path(path)
    records = parse_json(path)
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


def valid_text(text: str) -> bool:
    """True unless the string holds a lone surrogate, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def encode_example(tok, prompt: str, response: str, max_len: int, full_text=False):
    """The Example of prompt + response + EOS, truncated to max_len, the prompt masked unless
    full_text; None when truncation leaves no response token to learn from."""
    n_prompt = len(tok.encode(prompt))
    ids = tok.encode(prompt + response, eos=True)
    labels = list(ids) if full_text else [IGNORE] * n_prompt + ids[n_prompt:]
    ids, labels = ids[:max_len], labels[:max_len]
    return Example(ids, labels, prompt) if any(y != IGNORE for y in labels[n_prompt:]) else None


def load_examples(path, tok, max_len: int, template="alpaca", full_text=False) -> DataSet:
    """The Examples of an instruction file, counting those truncated and those dropped."""
    examples, truncated, dropped = [], 0, 0
    for r in read_records(path, ("instruction", "output")):
        prompt = format_prompt(r["instruction"], r.get("input", ""), template)
        ex = encode_example(tok, prompt, r["output"], max_len, full_text)
        truncated += len(tok.encode(prompt + r["output"], eos=True)) > max_len
        dropped += ex is None
        examples += [ex] if ex else []
    if not examples:
        raise UserError(f"{path}: every example is longer than --max-seq-len {max_len} before its "
                        f"response starts; raise --max-seq-len")
    return DataSet(examples, truncated, dropped)


def split(examples: list, val_fraction: float, seed: int):
    """(validation, training) lists: a seeded shuffle, the first val_fraction held out."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(len(examples) * val_fraction) if len(examples) > 1 else 0
    return [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]


def collate(examples, pad_id: int, device) -> Batch:
    """Right-pad a micro-batch of Examples; padding is labelled IGNORE."""
    t = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)  # (B, T)
    for i, ex in enumerate(examples):
        ids[i, : len(ex.ids)], labels[i, : len(ex.labels)] = torch.tensor(ex.ids), torch.tensor(ex.labels)
    return Batch(ids.to(device), labels.to(device))


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list:
    """The examples of optimizer step `step`: drawn with replacement (as the official code does),
    from a generator seeded by (seed, step), so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_examples, (batch_size,), generator=g).tolist()
