"""The converted directory written and checked (the work behind convert_weights.py, which holds
the conversion itself), the checks of what a converter copies in, and `model_dir`, which finds the
model for train.py and generate.py, converting the embedded default on first use.

    write_model_dir(source, out_dir, {"meta": from_meta, "hf": from_hf, "gguf": from_gguf}, dtype, force)
    check_tokenizer(out_dir, vocab_size, source)   # the ids inside the vocabulary, the template renders
    path = model_dir(None)     # the embedded default, converted once

Not run on its own. Read next: default_model.py.
"""
import json
import sys
from pathlib import Path

from support.chat import Chat
from support.checkpoint import check_args, check_runs, check_shapes, write_dir
from support.default_model import DEFAULT_MODEL, DEFAULT_MODEL_DIR, fetch_smollm2
from support.errors import UserError
from support.flags import DTYPES
from support.gguf_file import from_gguf
from support.inputs import read_json_object
from support.outputs import check_output_dir
from support.temporary import new_directory
from support.tokenizer import Tokenizer


def detect(source: str):
    """(kind, path) of SOURCE: "gguf" for the default model's name or a GGUF file, "meta" or "hf" for
    a checkpoint folder."""
    if source == DEFAULT_MODEL:
        return "gguf", fetch_smollm2()
    path = Path(source).expanduser()
    if path.is_file() and path.name.startswith("consolidated.") or path.name == "params.json":
        path = path.parent
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", path
        raise UserError(f"{path}: not a GGUF file (a Meta or Hugging Face checkpoint is a directory)")
    if not path.is_dir():
        raise UserError(f"{source} not found (give a checkpoint directory, a .gguf file, "
                        f"or {DEFAULT_MODEL})")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta", path
    if (path / "config.json").is_file():
        return "hf", path
    raise UserError(f"{path}: neither a Meta checkpoint (params.json + consolidated.*.pth) nor a "
                    f"Hugging Face one (config.json + weights)")


def write_model_dir(source: str, out_dir, readers: dict, dtype: str = None, force=False) -> Path:
    """SOURCE (see `detect`) read by readers[kind] (convert_weights.py's from_meta, from_hf, or
    gguf_file.from_gguf) into the directory OUT_DIR. The config is checked before anything is
    written, and the directory is put in place only once it is complete, its tokenizer checked
    (`check_tokenizer`) and the model runs a forward pass."""
    out = Path(out_dir)
    check_output_dir(out, [source] if source != DEFAULT_MODEL else [], force)  # before any work
    kind, path = detect(source)
    try:
        args, state, write_tokenizer = readers[kind](path)
    except (KeyError, IndexError, RuntimeError, ValueError) as e:  # what the checks above did not foresee
        raise UserError(f"{path}: the checkpoint's tensors do not fit together ({type(e).__name__}: "
                        f"{str(e)[:100]})") from None
    check_args(args, path)
    check_shapes(args, {k: v.shape for k, v in state.items()}, str(path))
    if dtype:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    with new_directory(out, source) as tmp:
        write_dir(args, state, tmp)
        write_tokenizer(tmp)
        check_tokenizer(tmp, args.vocab_size, path)
        check_runs(args, state, path)
        (tmp / "source.json").write_text(json.dumps({"source": str(source)}) + "\n")
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {n / 1e6:.1f}M parameters, dim {args.dim}, {args.n_layers} layers, "
          f"{args.n_heads} heads ({args.n_kv_heads} key/value), vocab {args.vocab_size}")
    return out


def check_tokenizer(folder: Path, vocab_size: int, where):
    """The tokenizer written to `folder`: its BOS and EOS ids inside the vocabulary, it loads, and
    its chat template (if any) compiles and renders a trial conversation (support/chat.py's Chat)."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return
    ids = read_json_object(config)
    for name in ("bos_id", "eos_id"):
        value = ids.get(name)
        if value is not None and not (type(value) is int and 0 <= value < vocab_size):
            raise UserError(f"{where}: the tokenizer's {name[:3]} token id {value!r} is outside the "
                            f"vocabulary of {vocab_size}")
    tok = Tokenizer(folder, vocab_size)  # the files load (a one-line error if not)
    if "chat_template" in ids:
        try:
            Chat(ids["chat_template"], tok)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


def model_dir(path=None) -> Path:
    """The model directory to use: `path`, or the embedded default, converted on first use."""
    if path is not None:
        return Path(path)
    config = DEFAULT_MODEL_DIR / "tokenizer_config.json"
    if not (DEFAULT_MODEL_DIR / "params.json").is_file() or not config.is_file() or \
            "chat_template" not in read_json_object(config):
        print(f"first use: making {DEFAULT_MODEL_DIR} (python convert_weights.py {DEFAULT_MODEL})",
              file=sys.stderr)  # again when it was made before tokenizer_config.json held the chat template
        write_model_dir(DEFAULT_MODEL, DEFAULT_MODEL_DIR, {"gguf": from_gguf}, force=True)
    return DEFAULT_MODEL_DIR
