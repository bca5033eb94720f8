"""Meta's LLaMA checkpoints: params.json + consolidated.00.pth ... (model-parallel shards).

    args, state, write_tokenizer = from_meta(Path("~/llama-2-7b"))

Meta's tensor names and interleaved q/k layout are model.py's own: shards are only joined.
Not run on its own. Read next: hf.py.
"""
from pathlib import Path

import torch

from model import ModelArgs
from support.checkpoint import copy_sentencepiece, require_sizes
from support.errors import UserError
from support.inputs import load_weights, read_json_object


def from_meta(src: Path):
    params = read_json_object(src / "params.json")
    require_sizes(params, ("dim", "n_layers", "n_heads"), src / "params.json")
    shards = sorted(src.glob("consolidated.*.pth"))
    for i, shard in enumerate(shards):
        if shard.name != f"consolidated.{i:02d}.pth":
            raise UserError(f"{src}: shard consolidated.{i:02d}.pth is missing ({len(shards)} found)")
    parts = [load_weights(s, "checkpoint shard", mmap=True) for s in shards]
    dim, n_heads = params["dim"], params["n_heads"]
    state = {}
    for key in parts[0]:
        if key == "rope.freqs":
            continue
        ts = [p[key] for p in parts]
        if len(ts) == 1 or ts[0].dim() == 1:  # one shard, or a norm (replicated)
            state[key] = ts[0]
        elif key == "tok_embeddings.weight":  # LLaMA-1/2 split the width, LLaMA-3 the vocabulary
            state[key] = torch.cat(ts, dim=1 if ts[0].shape[1] < dim else 0)
        else:  # wo and w2 are split along their input (row parallel), the rest along their output
            state[key] = torch.cat(ts, dim=1 if key.endswith(("wo.weight", "w2.weight")) else 0)
    args = ModelArgs(dim=dim, n_layers=params["n_layers"], n_heads=n_heads,
                     n_kv_heads=params.get("n_kv_heads") or n_heads,
                     vocab_size=state["tok_embeddings.weight"].shape[0],  # params.json may say -1
                     hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
                     norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 1e4),
                     max_seq_len=params.get("max_seq_len", 4096), **meta_scaling(params))

    def tokenizer(out: Path):
        for place in (src, src.parent):
            if (place / "tokenizer.model").is_file():
                return copy_sentencepiece(place / "tokenizer.model", out, add_bos=True)
        print(f"warning: no tokenizer.model in {src} or its parent; generate.py will need one")

    return args, state, tokenizer


def meta_scaling(params: dict) -> dict:
    """LLaMA-3.1/3.2/3.3's `use_scaled_rope` in Meta's params.json: the "llama3" RoPE scaling with Meta's
    reference values (factor 8, low 1, high 4, an original context of 8192), unless params.json
    names its own factor and high-frequency factor."""
    if not params.get("use_scaled_rope"):
        return {}
    return {"rope_factor": params.get("rope_scaling_factor", 8.0), "rope_low_freq_factor": 1.0,
            "rope_high_freq_factor": params.get("rope_high_freq_factor", 4.0), "rope_original_context": 8192}
