"""Instruction data: the Alpaca template, token ids with labels, and padded batches.

    tok = Tokenizer("checkpoints/smollm2-135m-instruct")     # text <-> ids (support/tokenizer.py)
    data = load_examples("alpaca.json", tok, max_len=512)   # DataSet(examples, truncated, dropped)
    batch = collate(data.examples[:8], tok.pad_id, "cpu")    # Batch(ids (B, T), labels (B, T))

A record is {"instruction", "input" (optional), "output"} (read, with an exact error for each bad
one, by support/inputs.read_records); its Example is the ids of BOS + prompt + response + EOS with
labels that are IGNORE on the prompt (unless full_text), so the loss is on the response only.
Read next: generate.py (decoding), then train.py.
"""
from pathlib import Path
from typing import NamedTuple

import torch

from support.errors import UserError
from support.inputs import read_records, text_lines

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


class Prompt(NamedTuple):
    instruction: str
    input: str = ""


def read_prompts(path) -> list:
    """The Prompts of a file to answer: instruction records (JSON or JSONL), or a .txt file with one
    instruction per line."""
    if Path(path).suffix == ".txt":
        return [Prompt(line) for line in text_lines(path)]
    return [Prompt(r["instruction"], r.get("input", "")) for r in read_records(path, ("instruction",))]


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
