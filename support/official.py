"""The official released Aligner checkpoints (lit-llama format), read into aligner.py's layout.

    tokens, gates, start_layer, per_layer = read_official_aligner(torch_dict, "file.pth")

Not run on its own. Read next: adapter_file.py (our own adapter format, which calls this).
"""
import re

import torch

from model import CONFIGS
from support.errors import UserError


def read_official_aligner(sd: dict, where):
    """(tokens, gates (L - s, H), start layer, per_layer) of a released Aligner checkpoint:
    `global_value_embedding.weight` (N, D), per layer `transformer.h.{l}.attn.adapter_wte.weight`
    (copies of it, or per-layer prompts in older adapters) and `transformer.h.{l}.attn.gating_factor`:
    (1,H,1,1), litgpt's (1,1,H,1), or one scalar per layer in older lit-llama files."""
    gates = official_layers(sd, "gating_factor", where)
    wte = official_layers(sd, "adapter_wte.weight", where)
    start, n_layers = min(gates), max(gates) + 1
    if len(gates) != n_layers - start or wte and sorted(wte) != sorted(gates):
        raise UserError(f"{where}: gates or prompts are missing for layers from {start} to {n_layers - 1}")
    shared = sd.get("global_value_embedding.weight")
    if shared is not None:
        wte = {i: official_tensor(shared, where) for i in gates}  # one token set, shared by every layer
    if len({tuple(v.shape) for v in wte.values()}) != 1 or wte[start].dim() != 2:
        raise UserError(f"{where}: no Aligner tokens, or prompts that are not (N, D) tensors of one shape")
    layers = range(start, n_layers)
    per_layer = any(not torch.equal(v, wte[start]) for v in wte.values())
    tokens = torch.stack([wte[i] for i in layers]) if per_layer else wte[start]  # (L - s, N, D) or (N, D)
    n_heads = official_head_count(gates, tokens.shape[-1], n_layers, where)
    gates = torch.stack([gates[i].float().flatten().expand(n_heads) for i in layers])  # (L - s, H)
    return tokens, gates, start, per_layer


def official_tensor(value, where):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
        raise UserError(f"{where}: an Aligner entry is not a float tensor; the file is damaged")
    return value


def official_layers(sd: dict, name: str, where) -> dict:
    """{layer: tensor} of the keys `transformer.h.{layer}.attn.{name}`."""
    pattern = r"transformer\.h\.(\d+)\.attn\." + re.escape(name)
    matches = ((re.fullmatch(pattern, k) if isinstance(k, str) else None, v) for k, v in sd.items())
    return {int(m.group(1)): official_tensor(v, where) for m, v in matches if m}


def official_head_count(gates: dict, dim: int, n_layers: int, where) -> int:
    """The head count from per-head gates or, for one scalar per layer, from a known model size."""
    sizes = {g.numel() for g in gates.values()}
    if len(sizes) > 1:
        raise UserError(f"{where}: the layers' gates differ in size ({sorted(sizes)})")
    n_heads = sizes.pop()
    known = [a.n_heads for a in CONFIGS.values() if (a.dim, a.n_layers) == (dim, n_layers)]
    if n_heads == 1 and not known:
        raise UserError(f"{where}: scalar gates and no known model with dim {dim} and {n_layers} layers, "
                        f"so the head count is unknown")
    return known[0] if n_heads == 1 else n_heads
