"""Meta's LLaMA checkpoint folders: params.json (checked) + consolidated.00.pth ... (model-parallel
shards), and tokenizer.model beside them. convert_weights.py joins the shards (`join_shards`).

    params = read_meta_params(src / "params.json")   # field types checked, the sizes positive
    parts = meta_shards(src)                          # one state dict per shard, in order

Not run on its own. Read next: hf.py.
"""
from pathlib import Path

from support.checkpoint import check_fields, copy_sentencepiece
from support.errors import UserError
from support.inputs import load_weights, read_json_object

SIZES = ("dim", "n_layers", "n_heads")
FIELDS = {**dict.fromkeys(SIZES + ("n_kv_heads", "max_seq_len", "multiple_of"), "size"),
          "norm_eps": "number", "rope_theta": "number", "use_scaled_rope": "bool",
          "rope_scaling_factor": "number", "rope_high_freq_factor": "number"}


def read_meta_params(path: Path) -> dict:
    """params.json, each field that model.py reads of its type (vocab_size may be -1: unused)."""
    params = read_json_object(path)
    check_fields(params, FIELDS, path, required=SIZES)
    return params


def meta_shards(src: Path) -> list:
    """The state dicts of consolidated.00.pth, .01, ... (every one there, none skipped)."""
    shards = sorted(src.glob("consolidated.*.pth"))
    for i, shard in enumerate(shards):
        if shard.name != f"consolidated.{i:02d}.pth":
            raise UserError(f"{src}: shard consolidated.{i:02d}.pth is missing ({len(shards)} found)")
    return [load_weights(s, "checkpoint shard", mmap=True) for s in shards]


def meta_scaling(params: dict) -> dict:
    """LLaMA-3.1/3.2/3.3's `use_scaled_rope` in Meta's params.json: the "llama3" RoPE scaling with Meta's
    reference values (factor 8, low 1, high 4, an original context of 8192), unless params.json
    names its own factor and high-frequency factor."""
    if not params.get("use_scaled_rope"):
        return {}
    return {"rope_factor": params.get("rope_scaling_factor", 8.0), "rope_low_freq_factor": 1.0,
            "rope_high_freq_factor": params.get("rope_high_freq_factor", 4.0), "rope_original_context": 8192}


def meta_tokenizer(src: Path, vocab_size: int):
    """The writer of Meta's tokenizer.model (in the folder or its parent, where Meta's download puts it)."""
    def write(out: Path):
        for place in (src, src.parent):
            if (place / "tokenizer.model").is_file():
                return copy_sentencepiece(place / "tokenizer.model", out, True, None, vocab_size)
        print(f"warning: no tokenizer.model in {src} or its parent; generate.py will need one")

    return write
