"""Adapter files at the command line: look inside one, compare two, or merge one into the base.

    python adapter.py inspect FILE [--plot gates.png]   # our adapter or an official released checkpoint
    python adapter.py compare A B [--init START]    # equal numbers, tolerances, what moved from START
    python adapter.py merge --adapter out.pt --out DIR [--format hf]

`merge` folds a one-token Aligner into the base model's weights exactly, as a bias on wo in every
layer from the start layer on (aligner.merged_bias says why that is exact), and writes a model
directory (or a Hugging Face checkpoint) that runs at exactly the base model's cost.
Read next: convert_weights.py.
"""
import argparse
import shutil
from pathlib import Path

import torch

from aligner import merged_bias
from convert_weights import hf_layout
from support import report
from support.adapter_file import base_dir, fitting, load_aligner
from support.checkpoint import read_state, write_dir
from support.errors import UserError, run_main
from support.hf import to_hf
from support.inputs import load_weights
from support.outputs import check_output_dir, check_output_file
from support.temporary import new_directory


def inspect(path, plot=None):
    a = load_aligner(path)
    print(report.describe(a, path))
    if plot:
        check_output_file(plot, [path], [a.meta.get("base")])
        report.plot_gates(a, plot)


def merge(adapter, out, model=None, fmt="ours", force=False):
    """Fold a one-token Aligner into the base: b_l = merged_bias(...) on wo of each gated layer."""
    a = load_aligner(adapter)
    if a.n_tokens != 1:
        raise UserError(f"{adapter} has {a.n_tokens} tokens: only a one-token Aligner merges exactly "
                        f"(with N > 1 the prefix softmax weights depend on each query, so the added "
                        f"vector is not a constant); keep using it as an adapter")
    src = base_dir(a, adapter, model)
    check_output_dir(out, [src, adapter], force)  # before any work
    with new_directory(out, f"{src} + {adapter}") as tmp:
        args, state = read_state(src)
        fitting(a, args, src, adapter)
        for layer in range(a.start_layer, args.n_layers):
            wo = state[f"layers.{layer}.attention.wo.weight"]  # (D, H*E)
            bias = merged_bias(a, layer, state[f"layers.{layer}.attention.wv.weight"], wo, args)  # (D,)
            state[f"layers.{layer}.attention.wo.bias"] = bias.to(wo.dtype)
        args.wo_bias_from = a.start_layer
        if fmt == "hf":
            to_hf(args, hf_layout(args, state), src, tmp)
        else:
            write_dir(args, state, tmp)
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy(src / name, tmp / name)
    print(f"wrote {out} ({'Hugging Face' if fmt == 'hf' else 'model.py'} format): {src.name} with "
          f"{Path(adapter).name} merged as a wo bias in layers {a.start_layer}..{args.n_layers - 1}")


def compare(path_a, path_b, init=None):
    """Two adapters side by side (support/report.py's compare); `init`: the adapter both started from."""
    start = load_aligner(init) if init else None
    print(report.compare(load_aligner(path_a), load_aligner(path_b), path_a, path_b, start,
                         (stored_dtype(path_a), stored_dtype(path_b))))


def stored_dtype(path) -> str:
    """The dtype a file keeps its tokens in (the Aligner loads them as float32, exactly)."""
    d = load_weights(path)
    d = d.get("aligner", d)  # a training checkpoint nests the adapter
    tokens = d.get("tokens", d.get("global_value_embedding.weight"))
    return str(tokens.dtype).removeprefix("torch.") if isinstance(tokens, torch.Tensor) else "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="print an adapter's shape, parameter count and gates")
    i.add_argument("file", help="our adapter (.pt) or an official Aligner checkpoint (.pth)")
    i.add_argument("--plot", metavar="PNG", help="also draw the gates (needs matplotlib)")
    m = sub.add_parser("merge", help="fold a one-token Aligner into the base weights, exactly")
    m.add_argument("--adapter", required=True, help="a one-token adapter file")
    m.add_argument("--out", required=True, help="directory for the merged model")
    m.add_argument("--model", help="base model directory (default: the adapter's own base)")
    m.add_argument("--format", choices=["ours", "hf"], default="ours",
                   help="ours: a model.py directory; hf: a Hugging Face LLaMA checkpoint")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")
    c = sub.add_parser("compare", help="similarity of two adapters' tokens and gates")
    c.add_argument("a", help="first adapter")
    c.add_argument("b", help="second adapter")
    c.add_argument("--init", help="the adapter both started from (train.py's start): what moved, and where")
    args = p.parse_args(argv)
    if args.cmd == "inspect":
        run_main(inspect, args.file, args.plot)
    elif args.cmd == "merge":
        run_main(merge, args.adapter, args.out, args.model, args.format, args.force)
    else:
        run_main(compare, args.a, args.b, args.init)


if __name__ == "__main__":
    main()
