"""Answer prompts with a base model and Aligners: streamed one at a time, or a whole file in batches.

    python generate.py --adapter out.pt --prompt "Give three tips for staying healthy."
    echo "Name a colour." | python generate.py --adapter out.pt --compare   # base vs aligned
    python generate.py --adapter a.pt --adapter b.pt --compare --data questions.json --out answers.jsonl
    python chat.py --adapter chat.pt      # a conversation, in the adapter's chat template: chat.py

The base model comes from the adapters' metadata (or --model); prompts get the adapter's template
(Alpaca, raw, or the chat template recorded in it). All decoding goes through `decode`: a batch's
prompts are left-padded to one length, each row with its own positions and mask (padding changes
nothing) and, through aligner.AlignerBatch, its own Aligner or none: one frozen base serves several
alignments in one forward pass (Aligners of another token count go in another batch). The KV cache
is made once and reused; each row's Aligner keys/values are computed once per batch.
Read next: train.py (and dpo.py beside it).
"""
import sys
from contextlib import closing
from dataclasses import dataclass

import torch
from tqdm import tqdm

from aligner import AlignerBatch
from data import Prompt, prompt_ids, read_prompts
from model import Transformer
from support.adapter_file import load_for_generation
from support.errors import UserError
from support.flags import (Runtime, check_flags, count, flag, non_negative_float, path_text, run_command,
                           positive_int, probability, random_seed)
from support.inputs import prompt_lines
from support import memory
from support.temporary import write_jsonl


@dataclass
class Sampling:
    """How the next token is chosen; the defaults are the official generate/aligner.py's."""
    max_new_tokens: int = flag(100, "tokens to generate at most", positive_int)
    temperature: float = flag(0.7, "sampling temperature; 0 means greedy", non_negative_float)
    top_k: int = flag(200, "sample among the k most likely tokens (0: all)", count)
    top_p: float = flag(1.0, "nucleus sampling: smallest set with this much probability", probability)
    seed: int = flag(1337, "random seed, reset for every answer (and every batch)", random_seed)

    def __post_init__(self):
        check_flags(self)


def sample(logits, s: Sampling, generator=None):
    """Next token of each row (B, 1) from logits (B, vocab): greedy at temperature 0, else top-k/top-p."""
    if s.temperature <= 0:
        return logits.argmax(-1, keepdim=True)  # (B, 1)
    logits = (logits - logits.amax(-1, keepdim=True)) / s.temperature  # (B, vocab): max 0, so no overflow
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k).values[:, -1:]  # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, vocab)
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)  # (B, vocab) each
        probs = sorted_logits.softmax(-1)  # (B, vocab)
        cut = probs.cumsum(-1) - probs > s.top_p  # (B, vocab): outside the nucleus
        logits = logits.masked_fill(cut.scatter(-1, order, cut), float("-inf"))  # (B, vocab)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)


@torch.inference_mode()  # no_grad, and no version counters or views tracked: 7-13% faster steps on a CPU
def decode(model: Transformer, prompts: list, aligner=None, sampling=Sampling(), forward=None, pad_id=0,
           pool=None):
    """Yield the next token id of every row, (B,), one step at a time, up to max_new_tokens or the
    end of the context. `forward` runs the one-token steps: the model, or a torch.compile'd copy.
    `pool`: a Cache whose buffers every batch reuses, so that a compiled step sees one shape."""
    forward, device = model if forward is None else forward, model.output.weight.device
    n = max(map(len, prompts))
    if n >= model.args.max_seq_len:
        raise UserError(f"a prompt is {n} tokens, but the model's context is {model.args.max_seq_len}: "
                        f"shorten it")
    total = min(n + sampling.max_new_tokens, model.args.max_seq_len)
    pad = torch.tensor([n - len(p) for p in prompts], device=device)  # (B,) left padding of each row
    ids = torch.tensor([[pad_id] * (n - len(p)) + p for p in prompts], device=device)  # (B, n)
    cache = model.new_cache(len(prompts), total, aligner, pad, pool)  # Aligner keys/values computed once
    cols = torch.arange(n, device=device)  # (n,)
    logits = model(ids, aligner, cols, (cols == n - 1).expand_as(ids), cache)  # (B, vocab): last column only
    for pos in range(n, total):
        next_ids = sample(logits, sampling)  # (B, 1)
        yield next_ids[:, 0]
        if pos + 1 < total:
            logits = forward(next_ids, aligner, cols.new_tensor([pos]), cache=cache)[:, -1]  # (B, vocab)


def generate(model, ids: list, aligner=None, sampling=Sampling(), eos_id=None, forward=None):
    """Yield the new token ids of one prompt as they come, up to and including EOS."""
    with closing(decode(model, [ids], aligner, sampling, forward)) as steps:
        for next_ids in steps:
            yield next_ids.item()
            if next_ids.item() == eos_id:
                return


def generate_batch(model, prompts: list, aligner=None, sampling=Sampling(), eos_id=None, forward=None,
                   pad_id=0, pool=None) -> list:
    """The new token ids of every prompt, decoded together; each row ends at its own EOS (eos_id: one
    id, or a list of one id per row)."""
    answers, done = [[] for _ in prompts], [False] * len(prompts)
    eos = eos_id if isinstance(eos_id, list) else [eos_id] * len(prompts)
    with closing(decode(model, prompts, aligner, sampling, forward, pad_id, pool)) as steps:
        for next_ids in steps:
            for row, i in enumerate(next_ids.tolist()):
                answers[row] += [] if done[row] else [i]
                done[row] = done[row] or i == eos[row]
            if all(done):
                break
    return answers


def answer(model, tok, prompt: list, aligner=None, sampling=Sampling(), stream=None, forward=None,
           eos_id=None) -> str:
    """Generate for one prompt's ids; print the new text as it comes when `stream` is a file."""
    torch.manual_seed(sampling.seed)
    ids, shown, eos_id = [], "", tok.eos_id if eos_id is None else eos_id
    for i in generate(model, prompt, aligner, sampling, eos_id, forward):
        ids += [] if i == eos_id else [i]
        full = tok.decode(ids)
        if stream and not full.endswith("\ufffd"):  # wait for a whole multi-byte character
            stream.write(full[len(shown):])
            stream.flush()
            shown = full
    if stream:
        stream.write(tok.decode(ids)[len(shown):] + "\n")
    return tok.decode(ids)


@dataclass
class GenerateConfig:
    """What to answer, with which adapters, and where the answers go (--help lists these first)."""
    adapter: list = flag(None, "an Aligner file (repeatable: every prompt is answered with each)", path_text,
                         action="append")
    model: str = flag(None, "converted base model directory (default: the adapters' own base)", path_text)
    prompt: list = flag(None, "a prompt (repeatable); default: read stdin, one per line", action="append")
    data: str = flag(None, "prompts to answer in batches: Alpaca JSON/JSONL, or .txt (one a line)", path_text)
    out: str = flag(None, "with --data: JSONL answers, a record per prompt and adapter", path_text)
    batch_size: int = flag(8, "with --data: rows decoded together", positive_int)
    template: str = flag(None, "prompts in the Alpaca template, raw, or the chat template (default: the "
                         "adapter's own; alpaca)", choices=["alpaca", "raw", "chat"])
    no_adapter: bool = flag(False, "answer with the base model alone")
    compare: bool = flag(False, "answer each prompt with the base model too")

    def __post_init__(self):
        check_flags(self)
        if (self.data is None) != (self.out is None):
            raise UserError("--data and --out go together: the prompts file and the answers file")
        if self.no_adapter and self.adapter or self.compare and not self.adapter:
            raise UserError("--no-adapter forbids --adapter" if self.adapter else "--compare takes --adapter")


def batches(model, columns, n_prompts: int, batch_size: int):
    """(AlignerBatch set for the rows, [(prompt index, column index)] of the rows) for every batch.
    Columns are grouped by token count; the base model rides with the first Aligner's group."""
    first_n = next((col.aligner.n_tokens for col in columns if col.aligner), 0)
    groups = {}
    for c, col in enumerate(columns):
        groups.setdefault(col.aligner.n_tokens if col.aligner else first_n, []).append(c)
    for cols in groups.values():
        aligners = [columns[c].aligner for c in cols if columns[c].aligner]
        batcher = AlignerBatch(aligners, model.args).to(model.output.weight.device)
        slot = {c: aligners.index(columns[c].aligner) + 1 if columns[c].aligner else 0 for c in cols}
        jobs = [(r, c) for c in cols for r in range(n_prompts)]
        for chunk in (jobs[i: i + batch_size] for i in range(0, len(jobs), batch_size)):
            batcher.use([slot[c] for _, c in chunk])
            yield batcher, chunk


def answer_file(cfg: GenerateConfig, sampling: Sampling, model, tok, columns, forward):
    """Every prompt of --data with every column, in batches; the records go to --out atomically.
    Rows are grouped by the Aligner's token count, so each batch can mix Aligners (and the base)."""
    prompts, answers = read_prompts(cfg.data), {}
    ids = {(r, c): prompt_ids(tok, p, col.template, col.chat) for r, p in enumerate(prompts)
           for c, col in enumerate(columns)}
    longest = memory.checked_length(model, [len(i) for i in ids.values()], cfg.batch_size, sampling)
    pool = model.new_cache(cfg.batch_size, longest) if forward is not model else None  # compiled: one shape
    bar = tqdm(total=len(prompts) * len(columns), desc="answers", unit="prompt", dynamic_ncols=True)
    for batcher, chunk in batches(model, columns, len(prompts), cfg.batch_size):
        torch.manual_seed(sampling.seed)
        eos = [columns[c].eos_id for _, c in chunk]
        answers.update(zip(chunk, generate_batch(model, [ids[job] for job in chunk], batcher, sampling, eos,
                                                 forward, tok.pad_id, pool)))
        bar.update(len(chunk))
    bar.close()
    rows = [{**p._asdict(), "adapter": col.name, "answer": tok.decode(body), "new_tokens": len(body)}
            for r, p in enumerate(prompts) for c, col in enumerate(columns)
            for body in [answers[r, c][:-1] if answers[r, c][-1:] == [col.eos_id] else answers[r, c]]]
    write_jsonl(cfg.out, rows)
    print(f"wrote {cfg.out}: {len(rows)} answers ({len(prompts)} prompts x {len(columns)})")


def compiled(model, runtime: Runtime):
    """What runs the one-token steps: with --compile, torch.compile(model) (CUDA graphs on a GPU)."""
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if model.output.weight.is_cuda
                         else None) if runtime.compile else model


def respond(cfg: GenerateConfig, sampling: Sampling, runtime: Runtime):
    model, tok, columns = load_for_generation(cfg, runtime)
    forward = compiled(model, runtime)
    if cfg.data:
        return answer_file(cfg, sampling, model, tok, columns, forward)
    for text in prompt_lines(cfg.prompt):  # --prompt, else stdin: one prompt a line
        for col in columns:
            if len(columns) > 1:  # label each answer: base and aligned, or the adapter's file
                label = "aligned" if len(columns) == 2 and col.aligner else col.name
                print(f"--- {label}: ", end="", flush=True)
            ids = prompt_ids(tok, Prompt(text), col.template, col.chat)
            answer(model, tok, ids, col.aligner, sampling, sys.stdout, forward, col.eos_id)


def main(argv=None):
    run_command(respond, argv, __doc__, GenerateConfig, Sampling, Runtime.for_decoding())


if __name__ == "__main__":
    main()
