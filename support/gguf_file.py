"""GGUF files (llama.cpp) of a llama model: weights quantized or not, the tokenizer in the metadata.

    args, state, write_tokenizer = from_gguf(Path("model.Q4_K_M.gguf"))

GGUF stores q/k rows in Meta's interleaved layout; quantized tensors are dequantized to float32.
Not run on its own. Read next: official.py.
"""
from pathlib import Path

import torch

from model import ModelArgs
from support.checkpoint import check_fields, write_tokenizer_config
from support.errors import UserError
from support.tokenizer import check_tokenizer_json


GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
              "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
              "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
              "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
              "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def from_gguf(path: Path):
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf library raises plain ValueErrors/asserts on bad files
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise UserError(f"{path}: GGUF architecture {meta.get('general.architecture')!r} is not llama")
    p = "llama."
    sizes = [p + k for k in ("embedding_length", "block_count", "attention.head_count",
                             "feed_forward_length")]
    kinds = {**dict.fromkeys(sizes + [p + "attention.head_count_kv", p + "context_length"], "size"),
             p + "attention.layer_norm_rms_epsilon": "number", p + "rope.freq_base": "number"}
    check_fields(meta, kinds, f"{path} (GGUF metadata)", required=sizes)
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        base = parts[2] if parts[0] == "blk" and len(parts) == 4 else ".".join(parts[:-1])
        if base not in GGUF_NAMES:
            raise UserError(f"{path}: unexpected GGUF tensor {t.name}")
        ours = (f"layers.{parts[1]}." if parts[0] == "blk" else "") + f"{GGUF_NAMES[base]}.weight"
        values = dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
        state[ours] = torch.from_numpy(values.astype("float32"))  # GGUF q/k rows are Meta's layout
    if "tok_embeddings.weight" not in state:
        raise UserError(f"{path}: the GGUF file has no token_embd tensor")
    tie = "output.weight" not in state
    args = ModelArgs(dim=meta[p + "embedding_length"], n_layers=meta[p + "block_count"],
                     n_heads=meta[p + "attention.head_count"],
                     n_kv_heads=meta.get(p + "attention.head_count_kv") or meta[p + "attention.head_count"],
                     vocab_size=state["tok_embeddings.weight"].shape[0],
                     hidden_dim=meta[p + "feed_forward_length"],
                     norm_eps=meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5),
                     rope_theta=meta.get(p + "rope.freq_base", 1e4),
                     max_seq_len=meta.get(p + "context_length", 4096), tie_embeddings=tie)

    def tokenizer(out: Path):
        fields = {k[len("tokenizer.ggml."):]: f.contents() for k, f in reader.fields.items()
                  if k.startswith("tokenizer.ggml.")}
        if fields.get("model") != "gpt2":
            print(f"warning: GGUF tokenizer type {fields.get('model')!r} is not rebuilt (only "
                  f"byte-level BPE, 'gpt2', is); put a tokenizer.json in {out} yourself")
            return
        template = reader.fields.get("tokenizer.chat_template")
        template = template.contents() if template else None
        if template is not None and not isinstance(template, str):
            raise UserError(f"{path}: tokenizer.chat_template is a {type(template).__name__}, not a text")
        _gguf_bpe({**fields, "chat_template": template}, out, path)
        check_tokenizer_json(out / "tokenizer.json", args.vocab_size)

    return args, state, tokenizer


def _bytes_to_unicode():
    """GPT-2's map from bytes to printable characters: byte-level BPE spells tokens with it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _gguf_bpe(fields: dict, out: Path, where):
    """Rebuild a byte-level BPE tokenizer.json from a GGUF's token list and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    for key in ("tokens", "merges"):
        if not isinstance(fields.get(key), list) or not all(isinstance(t, str) for t in fields[key]):
            raise UserError(f"{where}: tokenizer.ggml.{key} is not a list of texts")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in fields["tokens"]]
    merges = [tuple(m.split(" ", 1)) for m in fields["merges"]]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    types = fields.get("token_type") or []
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == 3])  # 3: control
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, kind in zip(tokens, types) if kind == 4])  # 4: user-defined
    tk.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out, fields.get("bos_token_id"), fields.get("eos_token_id"),
                           bool(fields.get("add_bos_token", False)), fields.get("chat_template"))
