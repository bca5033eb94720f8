"""The reference checks, written once: what the lesson graders (graders.py) and the tests
(tests/test_model.py) compare a model with. Each function builds the two sides of one comparison;
the caller compares them with support/tolerance.py's rule and words its own message.

    a = nonzero_aligner(model.args, 3)               # gates non-zero: zero gates switch it off
    ours, theirs = model(x, a), peft_logits(hf, a, x)[0]     # PEFT's AdaptionPrompt, same prompt
    cached, full = cached_and_full(model, seq, a)    # the KV cache against recomputing every step
    a, with_it, without = zero_gate_logits(model, x) # a new Aligner: exactly the base model

`aligner` and `model` are whatever is first on the import path: the project's (the tests) or a
student's copy (the graders, which load this file by path from the project, as support/tolerance.py).
Not run on its own. Read next: graders.py.
"""
import re

import torch


def nonzero_aligner(args, n_tokens: int, seed=3, per_layer=False):
    """An Aligner whose gates are non-zero (a new one's are zero, which would switch it off)."""
    from aligner import Aligner

    torch.manual_seed(seed)
    a = Aligner(args, n_tokens, per_layer=per_layer)
    with torch.no_grad():
        a.gates.normal_(0, 0.5)
    return a


def peft_model(hf, n_tokens: int, n_adapted: int):
    """(PEFT's AdaptionPrompt around transformers' `hf`, {layer: its adapted attention}): the top
    `n_adapted` layers learn a prompt of `n_tokens` and a gate each."""
    from peft import AdaptionPromptConfig, get_peft_model

    cfg = AdaptionPromptConfig(adapter_len=n_tokens, adapter_layers=n_adapted, task_type="CAUSAL_LM")
    pm = get_peft_model(hf, cfg).eval()
    adapted = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "adaption_prompt"):
            adapted[int(re.search(r"layers\.(\d+)\.", name).group(1))] = mod
    return pm, adapted


@torch.no_grad()
def peft_logits(hf, aligner, x, per_head=True):
    """(PEFT's logits (B, T, vocab) with the Aligner written in, the adapted layers): its prompt in
    every layer from start_layer on (each layer's own with per_layer), and its gates: per head as a
    (1, H, 1, 1) gate, or (per_head=False) the layer's first, PEFT's own scalar gate. PEFT's prefix
    code is its own: no RoPE on the prompt, a softmax of its own."""
    pm, adapted = peft_model(hf, aligner.n_tokens, hf.config.num_hidden_layers - aligner.start_layer)
    for layer, mod in adapted.items():
        i = layer - aligner.start_layer
        tokens = aligner.tokens.detach()[i] if aligner.per_layer else aligner.tokens.detach()  # (N, D)
        gate = aligner.gates.detach()[i]  # (H,)
        mod.adaption_prompt = torch.nn.Parameter(tokens[None].clone())  # (1, N, D)
        gate = gate.view(1, -1, 1, 1) if per_head else gate[:1]  # (1, H, 1, 1) or (1,)
        mod.adaption_gate = torch.nn.Parameter(gate.clone())
    return pm(input_ids=x).logits, sorted(adapted)  # (B, T, vocab)


@torch.no_grad()
def cached_and_full(model, seq: list, aligner=None, prefill=5):
    """(logits (T, vocab) of one sequence decoded with a KV cache: `prefill` tokens at once, then one
    token a step; the same logits recomputed over the whole sequence at once)."""
    full = model(torch.tensor([seq]), aligner)[0]  # (T, vocab)
    cache = model.new_cache(1, len(seq), aligner)
    first = model(torch.tensor([seq[:prefill]]), aligner, torch.arange(prefill), cache=cache)[0]  # (P, vocab)
    steps = [model(torch.tensor([[t]]), aligner, torch.tensor([i]), cache=cache)[0, 0]  # (vocab,) each
             for i, t in enumerate(seq[prefill:], prefill)]
    return torch.cat([first, torch.stack(steps)]), full  # (T, vocab) each


@torch.no_grad()
def zero_gate_logits(model, x, n_tokens=3):
    """(a new Aligner, the logits (B, T, vocab) with it, the logits without): its gates start at
    zero, so the two are to be exactly equal (the same kernels on the same inputs)."""
    from aligner import Aligner

    a = Aligner(model.args, n_tokens=n_tokens)
    return a, model(x, a), model(x)  # (B, T, vocab) each
