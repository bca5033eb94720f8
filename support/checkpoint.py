"""The converted model directory that model.py loads: params.json (model.ModelArgs), one
model.safetensors with Meta's tensor names and layout, and the tokenizer files.

    model = load_model("checkpoints/smollm2-135m-instruct", device, dtype, quantize="none")
    model, tok, path = load_base(None, runtime, device)   # every command's: the Base, in the runtime's dtype
    args, state = read_state(path)            # every tensor's shape checked before any is read
    write_dir(args, state, path)              # the other way

Not run on its own. Read next: tokenizer.py.
"""
import json
import math
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import torch

from model import ModelArgs, Transformer
from support.chat import Chat, chat_of
from support.errors import UserError
from support.inputs import read_json_object
from support.quantize import onednn_for_cpu, quantize_base
from support.tokenizer import Tokenizer


def read_params(path) -> ModelArgs:
    """params.json, checked (`check_args`)."""
    known = {f.name for f in fields(ModelArgs)}
    return check_args(ModelArgs(**{k: v for k, v in read_json_object(path).items() if k in known}), path)


def check_args(args: ModelArgs, where) -> ModelArgs:
    """Every size a positive number of the right type (RoPE's theta and the norm's eps included), the
    heads dividing the width and the query heads dividing among the key/value heads."""
    for f in fields(args):
        v = getattr(args, f.name)
        ok = type(v) is f.type or (f.type is float and type(v) is int)
        if ok and f.type in (int, float) and f.name != "wo_bias_from":
            ok = math.isfinite(v) and v > 0
        if not ok:
            raise UserError(f"{where}: {f.name} is {v!r}, but it must be a positive {f.type.__name__}")
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads or args.head_dim % 2:
        raise UserError(f"{where}: dim {args.dim}, n_heads {args.n_heads} and n_kv_heads "
                        f"{args.n_kv_heads} do not divide into even heads")
    if args.rope_theta <= 1:  # the frequencies theta^(-2i/E) must fall from 1: below 1 they grow past float
        raise UserError(f"{where}: rope_theta is {args.rope_theta!r}, but RoPE's base must be above 1 "
                        f"(LLaMA uses 10,000 or 500,000)")
    if args.rope_factor != 1 and args.rope_high_freq_factor <= args.rope_low_freq_factor:
        raise UserError(f"{where}: RoPE scaling needs high_freq_factor > low_freq_factor, got "
                        f"{args.rope_high_freq_factor} and {args.rope_low_freq_factor}")
    return args


@torch.no_grad()
def check_runs(args: ModelArgs, state: dict, where):
    """The model these tensors make runs one forward pass over two tokens to finite logits."""
    with torch.device("meta"):
        model = Transformer(args)
    dtype = state["tok_embeddings.weight"].dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    logits = model(torch.tensor([[0, args.vocab_size - 1]]))  # (1, 2, vocab)
    if not torch.isfinite(logits).all():
        raise UserError(f"{where}: the converted model gives NaN or infinite logits; its weights or "
                        f"config are damaged")


KINDS = {"size": ("a positive whole number", lambda v: type(v) is int and v > 0),
         "id": ("a token id", lambda v: type(v) is int),
         "ids": ("a token id or a list of them", lambda v: type(v) is int or type(v) is list and v != []
                 and all(type(i) is int for i in v)),
         "number": ("a number", lambda v: type(v) in (int, float)),
         "bool": ("true or false", lambda v: type(v) is bool),
         "text": ("a text", lambda v: type(v) is str),
         "object": ("a JSON object", lambda v: type(v) is dict)}


def check_fields(config: dict, kinds: dict, where, required=()):
    """A checkpoint's own config (config.json, params.json, GGUF metadata): each field of `kinds` that
    is there and not null is of its kind (KINDS: a size is a positive whole number, never true/false),
    and each of `required` is there."""
    for key, kind in kinds.items():
        if config.get(key) is not None or key in required:
            what, ok = KINDS[kind]
            if not ok(config.get(key)):
                raise UserError(f"{where}: {key} is {config.get(key, 'missing')!r}, but a LLaMA needs {what} "
                                f"there")


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


def write_dir(args: ModelArgs, state: dict, path: Path):
    """model.safetensors and params.json into the directory `path`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    (path / "params.json").write_text(json.dumps(asdict(args), indent=2) + "\n")


def load_model(path, device="cpu", dtype=torch.float32, quantize="none") -> Transformer:
    """The frozen model in a converted directory, its layers' linear weights quantized when asked
    (support/quantize.py)."""
    args, state = read_state(path, device)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return quantize_base(model.requires_grad_(False).eval(), quantize)


class Base(NamedTuple):
    """A base as every command runs it: the frozen model, its tokenizer, the directory they came from."""
    model: Transformer
    tok: Tokenizer
    path: Path

    def chat(self, aligner=None) -> Chat:
        """The chat template an Aligner (None: the base alone) is asked in: the one it was trained
        with, else the directory's own (support/chat.py)."""
        return chat_of(aligner, self.path, self.tok)


def load_base(path, runtime, device, model=None, training=None) -> Base:
    """The Base of a converted directory (None: the embedded default, converted on first use), as
    every command runs it: in the runtime's dtype on `device`, quantized when asked (else, to decode
    in float32 on a CPU, through oneDNN), its causal attention through the einsum lines or sdpa.
    `model`: a base already loaded (the experiment shares one), set up the same way. `training` (a
    train.TrainConfig): first refuse a run whose memory floor exceeds what is free."""
    from support.convert import model_dir  # convert.py writes directories through this file
    from support.memory import check_training  # memory.py reads params.json through this file

    path = model_dir(path)
    if training is not None:
        check_training(training, path, runtime, device, loaded=model is not None)
    if model is None:
        model = load_model(path, device, runtime.pick_dtype(device), runtime.quantize)
        if training is None and runtime.quantize == "none" and not runtime.compile:  # decoding, evaluating
            onednn_for_cpu(model)  # float32 on a CPU: its products through oneDNN's kernel (quantize.py)
    model.use_sdpa(runtime.attention == "sdpa")
    return Base(model, Tokenizer(path, model.args.vocab_size), path)


def is_tiktoken(model_file: Path) -> bool:
    """True for a tiktoken ranks file (lines of "base64-token rank"), not a sentencepiece model."""
    with open(model_file, "rb") as f:
        first = f.readline(200).split()
    return len(first) == 2 and first[1].isdigit() and bool(re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]))


def write_tokenizer_config(out: Path, bos, eos, add_bos: bool, chat_template=None):
    """tokenizer_config.json: the ids data.Tokenizer adds around a text, and the chat template."""
    cfg = {"bos_id": bos, "eos_id": eos, "add_bos": bool(add_bos and bos is not None)}
    cfg.update({"chat_template": chat_template} if chat_template else {})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def copy_sentencepiece(model_file: Path, out: Path, add_bos: bool, chat_template=None, vocab_size=None):
    """A sentencepiece tokenizer.model into `out`, with its config; its pieces fit the vocabulary."""
    import shutil

    import sentencepiece

    if is_tiktoken(model_file):
        raise UserError(f"{model_file} is a tiktoken BPE file (Meta's LLaMA-3 layout), which sentencepiece "
                        f"cannot read: convert the Hugging Face release of this model (its tokenizer.json)")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{model_file}: not a sentencepiece model ({str(e)[:80]})") from None
    if vocab_size is not None and sp.get_piece_size() > vocab_size:
        raise UserError(f"{model_file}: {sp.get_piece_size()} pieces, more than the model's vocabulary of "
                        f"{vocab_size}: this tokenizer does not belong to this checkpoint")
    shutil.copy(model_file, out / "tokenizer.model")
    write_tokenizer_config(out, sp.bos_id(), sp.eos_id(), add_bos, chat_template)
