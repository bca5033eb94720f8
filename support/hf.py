"""Hugging Face LLaMA checkpoints, both ways: config.json + safetensors (or pytorch_model.bin) in,
and a LlamaForCausalLM checkpoint out (aligner merge --format hf, bench.py's peer).

    args, state, write_tokenizer = from_hf(Path("~/Llama-2-7b-hf"))
    tensors, config = hf_state(args, state)

Hugging Face stores each head's q/k rows as two halves one after the other; Meta (and model.py's
RoPE) interleave the pairs, so wq/wk rows are permuted back here (`unpermute`).
Not run on its own. Read next: gguf_file.py.
"""
import json
import shutil
from pathlib import Path

import torch

from model import ModelArgs
from support.chat import hf_template
from support.checkpoint import copy_sentencepiece, is_tiktoken, require_sizes, write_tokenizer_config
from support.errors import UserError
from support.inputs import load_weights, read_json_object


HF_TOP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
HF_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
            "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm"}


def rename(key: str, top: dict, layer: dict, prefix_from: str, prefix_to: str):
    """One tensor name to the other convention: `top` for whole-model tensors, `layer` inside
    layer i ("{prefix}{i}.{module}.weight")."""
    module, _, kind = key.rpartition(".")
    if module in top:
        return f"{top[module]}.{kind}"
    i, _, sub = module.removeprefix(prefix_from).partition(".")
    if not module.startswith(prefix_from) or sub not in layer:
        raise UserError(f"unexpected tensor {key}")
    return f"{prefix_to}{i}.{layer[sub]}.{kind}"


def unpermute(w, n_heads: int, where="a q/k projection"):
    """Hugging Face's q/k rows (per head: all first halves, then all second halves) back to
    Meta's interleaved pairs; n_heads is the key/value head count for wk (GQA-safe)."""
    if w.dim() == 1:  # a bias (Qwen2): the same rows, one column
        return unpermute(w[:, None], n_heads, where)[:, 0]
    if w.dim() != 2 or w.shape[0] % (2 * n_heads):
        raise UserError(f"{where} has shape {tuple(w.shape)}, which does not split into {n_heads} heads")
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute(w, n_heads: int):
    """Meta's interleaved q/k rows to Hugging Face's halves: the inverse of `unpermute`."""
    if w.dim() == 1:
        return permute(w[:, None], n_heads)[:, 0]
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf(args: ModelArgs, state: dict, src: Path, out: Path):
    """Write our tensors as a Hugging Face LlamaForCausalLM checkpoint (config.json + safetensors)."""
    from safetensors.torch import save_file

    tok_file = src / "tokenizer_config.json"
    tok_cfg = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    hf, config = hf_state(args, state, tok_cfg.get("bos_id"), tok_cfg.get("eos_id"))
    save_file(hf, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def hf_state(args: ModelArgs, state: dict, bos_id=None, eos_id=None):
    """(tensors, config.json dict) of a Hugging Face LlamaForCausalLM equal to our model. A merged
    Aligner's wo bias needs attention_bias=True, which gives q/k/v/o a bias each in every layer:
    those the merge did not make are zeros."""
    top, layer = ({v: k for k, v in d.items()} for d in (HF_TOP, HF_LAYER))
    hf = {}
    for key, tensor in state.items():
        name = rename(key, top, layer, "layers.", "model.layers.")
        if key.endswith(("attention.wq.weight", "attention.wq.bias")):
            tensor = permute(tensor, args.n_heads)
        elif key.endswith(("attention.wk.weight", "attention.wk.bias")):
            tensor = permute(tensor, args.n_kv_heads)
        hf[name] = tensor.contiguous()
    if args.wo_bias_from >= 0 or args.qkv_bias:
        dtype = state["tok_embeddings.weight"].dtype
        kv = args.n_kv_heads * args.head_dim
        for i in range(args.n_layers):
            for proj, size in (("q_proj", args.dim), ("k_proj", kv), ("v_proj", kv), ("o_proj", args.dim)):
                hf.setdefault(f"model.layers.{i}.self_attn.{proj}.bias", torch.zeros(size, dtype=dtype))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
              "attention_bias": args.wo_bias_from >= 0 or args.qkv_bias, "mlp_bias": False,
              "hidden_act": "silu",
              "bos_token_id": bos_id, "eos_token_id": eos_id,
              "torch_dtype": str(state["tok_embeddings.weight"].dtype).removeprefix("torch.")}
    if args.rope_factor != 1:
        config["rope_scaling"] = {"rope_type": "llama3", **{k: getattr(args, v) for k, v in SCALING.items()}}
    return hf, config


def read_hf_config(src: Path) -> dict:
    """config.json of a Hugging Face LLaMA, refused where model.py would compute something else."""
    cfg = read_json_object(src / "config.json")
    sizes = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
    require_sizes(cfg, sizes + ("num_key_value_heads",) * (cfg.get("num_key_value_heads") is not None),
                  src / "config.json")
    if cfg.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise UserError(f"{src}/config.json: model_type {cfg.get('model_type')!r} is not a LLaMA")
    rope = cfg.get("rope_parameters") or {}  # transformers 5.x; 4.x keeps rope_theta at the top
    cfg["scaling"] = rope_scaling(cfg.get("rope_scaling") or rope, src / "config.json")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{src}/config.json: attention/MLP biases are not part of LLaMA")
    check_heads_and_activation(cfg, src / "config.json")
    thetas = [v for v in (cfg.get("rope_theta"), rope.get("rope_theta")) if v is not None]
    cfg["rope_theta"] = thetas[0] if thetas else 1e4
    cfg["context"] = context(cfg, src / "config.json")
    return cfg


SCALING = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
           "high_freq_factor": "rope_high_freq_factor",
           "original_max_position_embeddings": "rope_original_context"}


def rope_scaling(params: dict, where) -> dict:
    """The ModelArgs fields of a config's RoPE scaling: none, or LLaMA-3.1's "llama3"; any other
    kind (linear, dynamic, yarn, longrope, ...) is refused rather than computed as something else."""
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return {}
    if kind != "llama3":
        raise UserError(f"{where}: RoPE scaling {kind!r} is not supported by model.py (only 'llama3', "
                        f"LLaMA-3.1's; linear, dynamic, yarn and longrope are refused)")
    missing = [k for k in SCALING if k not in params]
    if missing:
        raise UserError(f"{where}: the llama3 RoPE scaling lacks {', '.join(missing)}")
    return {ours: params[theirs] for theirs, ours in SCALING.items()}


def check_heads_and_activation(cfg: dict, where):
    """The heads divide the width and the key/value heads, and the feed-forward is LLaMA's SiLU."""
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim", dim // n_heads) != dim // n_heads:
        raise UserError(f"{where}: head_dim {cfg['head_dim']} != hidden_size / heads")
    if n_heads % (cfg.get("num_key_value_heads") or n_heads) or dim % n_heads:
        raise UserError(f"{where}: {dim} wide, {n_heads} heads and {cfg.get('num_key_value_heads')} "
                        f"key/value heads do not divide into even heads")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UserError(f"{where}: hidden_act {cfg['hidden_act']!r} is not LLaMA's SiLU")


def context(cfg: dict, where) -> int:
    """The context model.py computes exactly: max_position_embeddings, or a shorter sliding window
    (Mistral), beyond which the checkpoint attends to fewer positions than model.py does."""
    n, window = cfg.get("max_position_embeddings", 4096), cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False:
        return n
    if type(window) is not int or window < 1:
        raise UserError(f"{where}: sliding_window {window!r} is not a positive whole number")
    if type(n) is int and window < n:
        print(f"note: {where}: sliding window {window} < context {n}: the converted model's context is "
              f"{window}, where full attention (model.py) equals the window's")
        return window
    return n


def from_hf(src: Path):
    cfg = read_hf_config(src)
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = n_heads if cfg.get("num_key_value_heads") is None else cfg["num_key_value_heads"]
    state = {}
    for name, tensor in _hf_tensors(src).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        ours = rename(name, HF_TOP, HF_LAYER, "model.layers.", "layers.")
        if ours.rpartition(".")[0].endswith(("attention.wq", "attention.wk")):
            heads = n_heads if ".wq." in ours else n_kv
            tensor = unpermute(tensor, heads, f"{src}: {name}")  # q/k rows, biases too, in Meta's pairs
        state[ours] = tensor
    tie = cfg.get("tie_word_embeddings", False) or "output.weight" not in state
    if tie:
        state.pop("output.weight", None)
    args = ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv,
                     vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg["rope_theta"],
                     max_seq_len=cfg["context"], tie_embeddings=tie, qkv_bias=cfg["model_type"] == "qwen2",
                     **cfg["scaling"])
    eos = cfg.get("eos_token_id")
    bos, eos = cfg.get("bos_token_id"), eos[0] if isinstance(eos, list) else eos

    def tokenizer(out: Path):
        tok_cfg = src / "tokenizer_config.json"
        add_bos = json.loads(tok_cfg.read_text()).get("add_bos_token") if tok_cfg.is_file() else None
        template = hf_template(src)
        if (src / "tokenizer.model").is_file() and not is_tiktoken(src / "tokenizer.model"):
            return copy_sentencepiece(src / "tokenizer.model", out, add_bos is not False, template)
        if (src / "tokenizer.json").is_file():
            import tokenizers

            tk = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
            if add_bos is None:  # ask the tokenizer itself whether it puts BOS first
                add_bos = bos is not None and tk.encode("a").ids[:1] == [bos]
            shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
            return write_tokenizer_config(out, bos, eos, add_bos, template)
        print(f"warning: no tokenizer.model or tokenizer.json in {src}")

    return args, state, tokenizer


def _hf_tensors(src: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index_name).is_file():
            files = sorted(set(json.loads((src / index_name).read_text())["weight_map"].values()))
        elif (src / single).is_file():
            files = [single]
        else:
            continue
        state = {}
        for f in files:
            if not (src / f).is_file():
                raise UserError(f"{src}: shard {f} named in {index_name} is missing")
            try:
                part = (load_file(src / f) if f.endswith(".safetensors")
                        else load_weights(src / f, "checkpoint shard", mmap=True))
            except SafetensorError as e:
                raise UserError(f"{src / f}: not a valid safetensors file ({e})") from None
            state.update(part)
        return state
    raise UserError(f"{src}: config.json but no model.safetensors or pytorch_model.bin")
