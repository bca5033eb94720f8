"""Value alignment with an Aligner: Direct Preference Optimization on (chosen, rejected) pairs.

    python train.py --dpo --data data/prefs.json --init sft.pt --out dpo.pt

Records are {"instruction", "input" (optional), "chosen", "rejected"}. The loss (official
finetune/alignerDPO.py) is -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), with
log-probabilities summed over the response tokens. train.py uses this file only with --dpo:
`DPOLoss` stands where `train.sft_loss` stands, and `collate_pairs` where `data.collate` does.
Read next: support/README.md (what the primer leaves to the support package).
"""
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from data import IGNORE, Batch, DataSet, Example, collate, encode_example, format_prompt, read_records
from support.errors import UserError


class Pair(NamedTuple):
    chosen: Example
    rejected: Example

    @property
    def prompt_ids(self) -> list:
        return self.chosen.prompt_ids


def load_pairs(path, tok, max_len: int, template="alpaca") -> DataSet:
    return make_pairs(read_records(path, ("instruction", "chosen", "rejected")), tok, max_len, template, path)


def make_pairs(records, tok, max_len: int, template="alpaca", path="data") -> DataSet:
    """The Pairs of usable records; pairs whose answers are identical teach nothing and are skipped."""
    pairs, truncated, dropped = [], 0, 0
    for i, r in enumerate(records):
        if not r["chosen"].strip() or not r["rejected"].strip():
            raise UserError(f"{path}: record {i}: 'chosen' and 'rejected' must not be empty")
        if r["chosen"] == r["rejected"]:
            print(f"warning: {path}: record {i}: chosen and rejected are identical; skipped", file=sys.stderr)
            continue
        prompt = format_prompt(r["instruction"], r.get("input", ""), template)
        chosen, rejected = (encode_example(tok, prompt, r[k], max_len) for k in ("chosen", "rejected"))
        truncated += any(len(tok.encode(prompt + r[k], eos=True)) > max_len for k in ("chosen", "rejected"))
        dropped += chosen is None or rejected is None
        pairs += [Pair(chosen, rejected)] if chosen and rejected else []
    if not pairs:
        raise UserError(f"{path}: no usable preference pair (all identical, or longer than "
                        f"--max-seq-len {max_len})")
    return DataSet(pairs, truncated, dropped)


def collate_pairs(pairs, pad_id: int, device) -> Batch:
    """One batch of 2B sequences: the B chosen answers first, then the B rejected ones."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)


def sequence_logprob(model, aligner, ids, labels):
    """Sum of log p(label) over the labelled tokens: ids, labels (B, T) -> (B,). The logits at t
    predict the token at t+1, and only labelled positions reach the output projection."""
    keep = labels != IGNORE  # (B, T)
    logp = model(ids, aligner, keep=keep).log_softmax(-1)  # (n, vocab)
    picked = logp.gather(-1, labels[keep][:, None])[:, 0]  # (n,)
    per_position = torch.zeros(keep.shape, dtype=picked.dtype, device=ids.device)  # (B, T)
    return per_position.masked_scatter(keep, picked).sum(-1)  # (B,)


class DPOLoss:
    """The DPO objective. The reference policy is the SAME frozen base model with a frozen copy of
    the starting Aligner (or with none): memory is one model plus two tiny Aligners, never a
    second copy of the base weights. That is what makes DPO cheap with an Aligner. Called on a
    batch of collate_pairs, it returns (loss, statistics of the batch)."""

    def __init__(self, reference, beta: float):
        self.reference = reference.requires_grad_(False) if reference is not None else None
        self.beta = beta

    def __call__(self, model, aligner, batch: Batch):
        ids, labels = batch.ids[:, :-1], batch.labels[:, 1:]  # logits at t predict the token at t+1
        policy = sequence_logprob(model, aligner, ids, labels)  # (2B,)
        with torch.no_grad():
            ref = sequence_logprob(model, self.reference, ids, labels)  # (2B,)
        b = ids.shape[0] // 2  # chosen first, then rejected
        margin = (policy[:b] - policy[b:]) - (ref[:b] - ref[b:])  # (B,)
        stats = {"reward_accuracy": (margin > 0).float().mean().item(),
                 "margin": self.beta * margin.mean().item(),
                 "logp_chosen": policy[:b].mean().item(), "logp_rejected": policy[b:].mean().item()}
        return -F.logsigmoid(self.beta * margin).mean(), stats
