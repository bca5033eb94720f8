"""Convert a LLaMA checkpoint into the directory model.py loads: the whole conversion, top to bottom.

    python convert_weights.py smollm2-135m-instruct              # the embedded default model
    python convert_weights.py ~/llama-2-7b checkpoints/llama-2-7b  # Meta: params.json + consolidated.*.pth
    python convert_weights.py ~/Llama-2-7b-hf checkpoints/l2-7b    # Hugging Face: config.json + weights
    python convert_weights.py model.Q4_K_M.gguf checkpoints/m      # a GGUF file of a llama model

model.py keeps Meta's tensor names and layout. A Meta checkpoint only has its shards joined
(`join_shards`); a Hugging Face one is renamed through HF_NAMES, its q/k rows put back in Meta's
order (`unpermute`) and its config.json read into ModelArgs (`hf_args`). support/convert.py writes
the directory and puts it in place only once its shapes, one forward pass, the tokenizer's ids and a
trial render of the chat template pass. The file formats (GGUF, safetensors shards, tokenizer files)
are read in support/. Read next: demo.py.
"""
import argparse
import re
from pathlib import Path

import torch

from model import ModelArgs
from support.convert import write_model_dir
from support.default_model import DEFAULT_MODEL
from support.errors import UserError, run_main
from support.flags import DTYPES
from support.gguf_file import from_gguf
from support.hf import hf_context, hf_rope, hf_tensors, hf_tokenizer, read_hf_config
from support.meta import meta_scaling, meta_shards, meta_tokenizer, read_meta_params

# Hugging Face's tensor names -> ours (Meta's); {} is the layer number, ".weight"/".bias" is kept.
HF_NAMES = {
    "model.embed_tokens": "tok_embeddings",
    "model.layers.{}.input_layernorm": "layers.{}.attention_norm",
    "model.layers.{}.self_attn.q_proj": "layers.{}.attention.wq",
    "model.layers.{}.self_attn.k_proj": "layers.{}.attention.wk",
    "model.layers.{}.self_attn.v_proj": "layers.{}.attention.wv",
    "model.layers.{}.self_attn.o_proj": "layers.{}.attention.wo",
    "model.layers.{}.post_attention_layernorm": "layers.{}.ffn_norm",
    "model.layers.{}.mlp.gate_proj": "layers.{}.feed_forward.w1",
    "model.layers.{}.mlp.down_proj": "layers.{}.feed_forward.w2",
    "model.layers.{}.mlp.up_proj": "layers.{}.feed_forward.w3",
    "model.norm": "norm",
    "lm_head": "output",
}


def rename(key: str, names: dict) -> str:
    """One tensor name through `names` (HF_NAMES, or HF_NAMES turned around), its layer number kept."""
    module, _, kind = key.rpartition(".")
    general, layer = re.sub(r"\.\d+\.", ".{}.", module, count=1), re.findall(r"\.(\d+)\.", module)[:1]
    if general not in names or kind not in ("weight", "bias"):
        raise UserError(f"unexpected tensor {key}")
    return f"{names[general].format(*layer)}.{kind}"


# RoPE turns a head's q/k coordinates in pairs. Meta (and model.py) pair neighbours: (0, 1), (2, 3), ...
# Hugging Face's rotate_half pairs coordinate j with j + E/2, so its checkpoints hold each head's rows
# reordered: every pair's first row, then every pair's second row. Viewed per head as (pair, 2) rows,
# Meta's order is HF's (2, pair) transposed: one transpose each way, the same for a bias (Qwen2).
def unpermute(w, n_heads: int, where="a q/k projection"):
    """Hugging Face's q/k rows back to Meta's interleaved pairs (n_heads: the key/value heads for wk)."""
    if w.dim() == 1:
        return unpermute(w[:, None], n_heads, where)[:, 0]  # (rows,)
    if w.dim() != 2 or w.shape[0] % (2 * n_heads):
        raise UserError(f"{where} has shape {tuple(w.shape)}, which does not split into {n_heads} heads")
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)  # (rows, cols)


def permute(w, n_heads: int):
    """Meta's interleaved q/k rows to Hugging Face's halves: the inverse of `unpermute`."""
    if w.dim() == 1:
        return permute(w[:, None], n_heads)[:, 0]  # (rows,)
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (rows, cols)


def hf_args(cfg: dict, where) -> ModelArgs:
    """ModelArgs from a config.json that read_hf_config checked (field types, sizes, heads, SiLU)."""
    theta, scaling = hf_rope(cfg, where)  # rope_theta, and LLaMA-3.1's "llama3" scaling if any
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
                     hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                     rope_theta=theta, max_seq_len=hf_context(cfg, where),
                     tie_embeddings=cfg.get("tie_word_embeddings", False),
                     qkv_bias=cfg.get("model_type") == "qwen2", **scaling)


def from_hf(src: Path):
    """(ModelArgs, our tensors, the tokenizer's writer) of a Hugging Face checkpoint folder."""
    cfg = read_hf_config(src / "config.json")
    args, state = hf_args(cfg, src / "config.json"), {}
    for name, tensor in hf_tensors(src).items():  # safetensors or pytorch_model.bin, one file or shards
        if name.endswith("rotary_emb.inv_freq"):
            continue  # RoPE's frequencies: model.py computes its own
        ours = rename(name, HF_NAMES)
        if ".wq." in ours or ".wk." in ours:
            tensor = unpermute(tensor, args.n_heads if ".wq." in ours else args.n_kv_heads, f"{src}: {name}")
        state[ours] = tensor
    if args.tie_embeddings or "output.weight" not in state:  # the embedding is the output matrix too
        args.tie_embeddings = True
        state.pop("output.weight", None)
    return args, state, hf_tokenizer(src, cfg, args.vocab_size)


def hf_layout(args: ModelArgs, state: dict) -> dict:
    """Our tensors under Hugging Face's names and q/k order: the way back, which support/hf.py's
    export writes (adapter.py merge --format hf, bench.py's transformers peer)."""
    names, hf = {ours: theirs for theirs, ours in HF_NAMES.items()}, {}
    for key, tensor in state.items():
        if ".wq." in key or ".wk." in key:
            tensor = permute(tensor, args.n_heads if ".wq." in key else args.n_kv_heads)
        hf[rename(key, names)] = tensor.contiguous()
    return hf


def join_shards(parts: list, dim: int) -> dict:
    """Meta's model-parallel shards as one state dict. Linear weights are (out, in): wq, wk, wv, w1, w3
    and output are split on their output rows (column parallel), wo and w2 on their input columns (row
    parallel); the embedding on its width (LLaMA-1/2) or its vocabulary (LLaMA-3); norms are whole."""
    state = {}
    for key in parts[0]:
        if key == "rope.freqs":
            continue  # RoPE's frequencies: model.py computes its own
        ts = [p[key] for p in parts]
        if len(ts) == 1 or ts[0].dim() == 1:
            state[key] = ts[0]  # (dim,) or the one shard
        elif key == "tok_embeddings.weight":
            state[key] = torch.cat(ts, dim=1 if ts[0].shape[1] < dim else 0)  # (vocab, dim)
        else:
            state[key] = torch.cat(ts, dim=1 if key.endswith(("wo.weight", "w2.weight")) else 0)  # (out, in)
    return state


def from_meta(src: Path):
    """(ModelArgs, our tensors, the tokenizer's writer) of Meta's params.json + consolidated.*.pth."""
    params = read_meta_params(src / "params.json")  # field types checked, the sizes positive
    state = join_shards(meta_shards(src), params["dim"])
    args = ModelArgs(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                     n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                     vocab_size=state["tok_embeddings.weight"].shape[0],  # params.json may say -1
                     hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],  # from multiple_of
                     norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 1e4),
                     max_seq_len=params.get("max_seq_len", 4096), **meta_scaling(params))
    return args, state, meta_tokenizer(src, args.vocab_size)


def convert(source: str, out_dir, dtype: str = None, force=False) -> Path:
    """SOURCE (a Meta or Hugging Face folder, a .gguf file, the default's name) as the directory OUT_DIR."""
    readers = {"meta": from_meta, "hf": from_hf, "gguf": from_gguf}
    return write_model_dir(source, out_dir, readers, dtype, force)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    p.add_argument("source", help=f"a Meta or Hugging Face checkpoint directory, a .gguf file, "
                                  f"or {DEFAULT_MODEL!r}")
    p.add_argument("out_dir", nargs="?", help="where to write (default: checkpoints/NAME)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="store the weights in this dtype (default: as the source; GGUF: float32)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = p.parse_args(argv)
    out = args.out_dir or Path("checkpoints") / Path(args.source.rstrip("/")).name.removesuffix(".gguf")
    run_main(convert, args.source, out, args.dtype, args.force)


if __name__ == "__main__":
    main()
