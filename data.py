"""Instruction data: the Alpaca template, token ids with labels, and padded batches.

    tok = Tokenizer("checkpoints/smollm2-135m-instruct")     # text <-> ids (support/tokenizer.py)
    data = load_examples("alpaca.json", tok, max_len=512)   # DataSet(examples, truncated, dropped)
    batch = collate(data.examples[:8], tok.pad_id, "cpu")    # Batch(ids (B, T), labels (B, T))

A record is {"instruction", "input" (optional), "output"} (support/inputs.read_records says what
is wrong with a bad one); its Example is the ids of BOS + prompt + response + EOS, labels IGNORE on
the prompt (unless full_text): the loss is on the response only. With a chat template, records are
conversations (support/chat.py), every assistant turn labelled.
Read next: generate.py (decoding), then train.py.
"""
from typing import NamedTuple

import torch

from support.errors import UserError
from support.inputs import read_records

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
    return [Prompt(r["instruction"], r.get("input", "")) for r in read_records(path, ("instruction",))]


def prompt_ids(tok, p: Prompt, template="alpaca", chat=None) -> list:
    """The ids of a Prompt to answer: format_prompt's text, or a user turn in a chat template."""
    if chat:
        return chat.prompt_ids([{"role": "user", "content": format_prompt(*p, template="raw")}])
    return tok.encode(format_prompt(*p, template=template))


class Example(NamedTuple):
    ids: list  # BOS + prompt + response + EOS, truncated
    labels: list  # the ids, IGNORE where the loss skips
    prompt_ids: list  # the ids of the prompt alone, for sample answers


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
    return Example(ids, labels, ids[:n_prompt]) if any(y != IGNORE for y in labels[n_prompt:]) else None


def load_examples(path, tok, max_len: int, template="alpaca", full_text=False, chat=None) -> DataSet:
    """The Examples of an instruction file, counting those truncated and those dropped; with `chat`
    (a support.chat.Chat), of a conversations file in the model's own chat template."""
    if chat:  # (ids, labels, prompt ids) of each conversation, or None (support/chat.py)
        encoded, truncated = chat.examples(path, max_len)
        examples = [Example(*e) if e else None for e in encoded]
    else:
        records = read_records(path, ("instruction", "output"))
        prompts = [format_prompt(r["instruction"], r.get("input", ""), template) for r in records]
        examples = [encode_example(tok, p, r["output"], max_len, full_text) for p, r in zip(prompts, records)]
        truncated = sum(len(tok.encode(p + r["output"], eos=True)) > max_len
                        for p, r in zip(prompts, records))
    if not any(examples):
        raise UserError(f"{path}: every example is longer than --max-seq-len {max_len} before its "
                        f"response starts; raise --max-seq-len")
    return DataSet([ex for ex in examples if ex], truncated, examples.count(None))


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
