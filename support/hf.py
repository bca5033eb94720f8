"""Hugging Face LLaMA checkpoint folders, both ways: what convert_weights.py reads from one (config.json
checked, the weight files, the tokenizer files), and a LlamaForCausalLM checkpoint written from
tensors already in Hugging Face's names and layout (adapter.py merge --format hf, bench.py's peer).

    cfg = read_hf_config(src / "config.json")       # field types, sizes, a LLaMA, heads that divide
    tensors = hf_tensors(src)                       # every tensor, under Hugging Face's names
    state, config = hf_state(args, hf_layout(args, ours))   # hf_layout: convert_weights.py

The key map and the q/k permutation are convert_weights.py's (HF_NAMES, unpermute, hf_layout).
Not run on its own. Read next: gguf_file.py.
"""
import json
import shutil
from pathlib import Path

import torch

from model import ModelArgs
from support.chat import hf_template
from support.checkpoint import check_fields, copy_sentencepiece, is_tiktoken, write_tokenizer_config
from support.errors import UserError
from support.inputs import load_weights, read_json_object
from support.tokenizer import check_tokenizer_json

SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")
FIELDS = {**dict.fromkeys(SIZES + ("num_key_value_heads", "head_dim", "max_position_embeddings"), "size"),
          "rms_norm_eps": "number", "rope_theta": "number", "tie_word_embeddings": "bool",
          "attention_bias": "bool", "mlp_bias": "bool", "use_sliding_window": "bool", "model_type": "text",
          "hidden_act": "text", "rope_scaling": "object", "rope_parameters": "object", "bos_token_id": "id",
          "eos_token_id": "ids"}


def read_hf_config(path: Path) -> dict:
    """config.json of a Hugging Face LLaMA, refused where model.py would compute something else."""
    cfg = read_json_object(path)
    check_fields(cfg, FIELDS, path, required=SIZES)
    if cfg.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise UserError(f"{path}: model_type {cfg.get('model_type')!r} is not a LLaMA")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{path}: attention/MLP biases are not part of LLaMA")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if n_heads % (cfg.get("num_key_value_heads") or n_heads) or dim % n_heads:
        raise UserError(f"{path}: {dim} wide, {n_heads} heads and {cfg.get('num_key_value_heads')} "
                        f"key/value heads do not divide into even heads")
    if (cfg.get("head_dim") or dim // n_heads) != dim // n_heads:
        raise UserError(f"{path}: head_dim {cfg['head_dim']} != hidden_size / heads")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UserError(f"{path}: hidden_act {cfg['hidden_act']!r} is not LLaMA's SiLU")
    return cfg


SCALING = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
           "high_freq_factor": "rope_high_freq_factor",
           "original_max_position_embeddings": "rope_original_context"}


def hf_rope(cfg: dict, where):
    """(rope_theta, the ModelArgs fields of its scaling): transformers 4.x keeps rope_theta and
    rope_scaling at the top of config.json, 5.x both in rope_parameters."""
    params = cfg.get("rope_parameters") or {}
    thetas = [v for v in (cfg.get("rope_theta"), params.get("rope_theta")) if v is not None]
    return thetas[0] if thetas else 1e4, rope_scaling(cfg.get("rope_scaling") or params, where)


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


def hf_context(cfg: dict, where) -> int:
    """The context model.py computes exactly: max_position_embeddings, or a shorter sliding window
    (Mistral), beyond which the checkpoint attends to fewer positions than model.py does."""
    n, window = cfg.get("max_position_embeddings", 4096), cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window") is False:
        return n
    if type(window) is not int or window < 1:
        raise UserError(f"{where}: sliding_window {window!r} is not a positive whole number")
    if window < n:
        print(f"note: {where}: sliding window {window} < context {n}: the converted model's context is "
              f"{window}, where full attention (model.py) equals the window's")
        return window
    return n


def hf_tensors(src: Path) -> dict:
    """Every tensor of a Hugging Face folder, under its own names: model.safetensors or
    pytorch_model.bin, or the shards an index (*.index.json) names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index_name).is_file():
            files = read_json_object(src / index_name).get("weight_map")
            if not isinstance(files, dict) or not all(isinstance(f, str) and f == Path(f).name
                                                      for f in files.values()):
                raise UserError(f"{src / index_name}: weight_map must map tensor names to file names "
                                f"in the same folder")
            files = sorted(set(files.values()))
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


def hf_chat_template(src: Path, tok_cfg: dict):
    """The folder's chat template (support/chat.py's hf_template), refused where one is there but
    is not a UTF-8 text (chat_template.jinja) or neither a text nor a list naming a "default" one."""
    try:
        template = hf_template(src)
    except UnicodeDecodeError as e:
        raise UserError(f"{src / 'chat_template.jinja'}: not UTF-8 text (byte {e.start})") from None
    given = tok_cfg.get("chat_template")
    if template is None and given is not None:
        raise UserError(f"{src / 'tokenizer_config.json'}: chat_template is a {type(given).__name__}, "
                        f"neither a text nor a list of named templates with a 'default' one")
    return template


def hf_tokenizer(src: Path, cfg: dict, vocab_size: int):
    """The writer of a Hugging Face folder's tokenizer: tokenizer.model (sentencepiece) or
    tokenizer.json, each checked, with config.json's BOS/EOS ids and the chat template."""
    eos = cfg.get("eos_token_id")
    bos, eos = cfg.get("bos_token_id"), eos[0] if isinstance(eos, list) else eos

    def write(out: Path):
        config = src / "tokenizer_config.json"
        tok_cfg = read_json_object(config) if config.is_file() else {}
        check_fields(tok_cfg, {"add_bos_token": "bool"}, config)
        add_bos, template = tok_cfg.get("add_bos_token"), hf_chat_template(src, tok_cfg)
        if (src / "tokenizer.model").is_file() and not is_tiktoken(src / "tokenizer.model"):
            model = src / "tokenizer.model"
            return copy_sentencepiece(model, out, add_bos is not False, template, vocab_size)
        if (src / "tokenizer.json").is_file():
            import tokenizers

            check_tokenizer_json(src / "tokenizer.json", vocab_size)
            try:
                tk = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
            except Exception as e:  # the library raises plain exceptions on a file it cannot build
                raise UserError(f"{src / 'tokenizer.json'}: cannot be read ({str(e)[:80]})") from None
            if add_bos is None:  # ask the tokenizer itself whether it puts BOS first
                add_bos = bos is not None and tk.encode("a").ids[:1] == [bos]
            shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
            return write_tokenizer_config(out, bos, eos, add_bos, template)
        print(f"warning: no tokenizer.model or tokenizer.json in {src}")

    return write


def to_hf(args: ModelArgs, tensors: dict, src: Path, out: Path):
    """Write a Hugging Face LlamaForCausalLM checkpoint (config.json + safetensors) into `out`:
    `tensors` in Hugging Face's names and layout (convert_weights.hf_layout), BOS/EOS from `src`,
    and the tokenizer of `src` as transformers' AutoTokenizer loads it (hf_tokenizer_files)."""
    from safetensors.torch import save_file

    tok_file = src / "tokenizer_config.json"
    tok_cfg = read_json_object(tok_file) if tok_file.is_file() else {}
    hf, config = hf_state(args, tensors, tok_cfg.get("bos_id"), tok_cfg.get("eos_id"))
    save_file(hf, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tok_cfg:
        hf_tokenizer_files(src, out, tok_cfg, args.max_seq_len)


def hf_tokenizer_files(src: Path, out: Path, ours: dict, context: int):
    """The tokenizer of our directory `src` in `out` for both readers: tokenizer_config.json keeps
    our keys (bos_id, eos_id, add_bos) and adds transformers' own (bos_token, eos_token,
    add_bos_token, tokenizer_class, model_max_length; chat_template is the same key in both). A
    tokenizer.json gets a post-processor that puts BOS first when add_bos says so, since
    transformers' tokenizers backend adds only what tokenizer.json adds; ours encodes without it."""
    from support.tokenizer import Tokenizer

    tok = Tokenizer(src)
    cfg = {**ours, "tokenizer_class": "TokenizersBackend", "bos_token": tok.token_text(tok.bos_id) or None,
           "eos_token": tok.token_text(tok.eos_id) or None, "add_bos_token": tok.add_bos,
           "add_eos_token": False, "model_max_length": context, "clean_up_tokenization_spaces": False}
    if (src / "tokenizer.model").is_file():
        shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
        cfg.update(tokenizer_class="LlamaTokenizer", legacy=False)
    elif (src / "tokenizer.json").is_file():
        import tokenizers
        from tokenizers import processors

        tk = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
        if tok.add_bos and tk.encode("a").ids[:1] != [tok.bos_id]:
            bos = [processors.TemplateProcessing(single=f"{cfg['bos_token']} $A",
                                                 pair=f"{cfg['bos_token']} $A {cfg['bos_token']} $B",
                                                 special_tokens=[(cfg["bos_token"], tok.bos_id)])]
            kept = [tk.post_processor] if tk.post_processor is not None else []
            tk.post_processor = processors.Sequence(kept + bos)
        tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def hf_state(args: ModelArgs, tensors: dict, bos_id=None, eos_id=None):
    """(tensors, config.json dict) of a Hugging Face LlamaForCausalLM equal to our model, from our
    tensors in Hugging Face's names and layout. A merged Aligner's wo bias needs attention_bias=True,
    which gives q/k/v/o a bias each in every layer: those the merge did not make are zeros."""
    hf = dict(tensors)
    dtype = hf["model.embed_tokens.weight"].dtype
    if args.wo_bias_from >= 0 or args.qkv_bias:
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
              "hidden_act": "silu", "bos_token_id": bos_id, "eos_token_id": eos_id,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    if args.rope_factor != 1:
        config["rope_scaling"] = {"rope_type": "llama3", **{k: getattr(args, v) for k, v in SCALING.items()}}
    return hf, config
