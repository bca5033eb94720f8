"""Convert a LLaMA checkpoint into the directory model.py loads.

    python convert_weights.py smollm2-135m-instruct              # the embedded default model
    python convert_weights.py ~/llama-2-7b checkpoints/llama-2-7b  # Meta: params.json + consolidated.*.pth
    python convert_weights.py ~/Llama-2-7b-hf checkpoints/l2-7b    # Hugging Face: config.json + weights
    python convert_weights.py model.Q4_K_M.gguf checkpoints/m      # a GGUF file of a llama model

The output directory holds params.json (model.ModelArgs), model.safetensors with Meta's tensor
names and layout, and the tokenizer (tokenizer.model or tokenizer.json, plus
tokenizer_config.json). It is written to a temporary directory first and renamed at the end, so an
error never leaves a half-written OUT_DIR behind. The work is in the support package: convert.py
(which format, and the directory), meta.py, hf.py, gguf_file.py (one reader each), checkpoint.py.
Read next: demo.py.
"""
import argparse
from pathlib import Path

from support.convert import convert
from support.default_model import DEFAULT_MODEL
from support.errors import run_main
from support.flags import DTYPES


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
