"""The Aligner: N learnable tokens shared by every layer, and one gate per head per layer.

Paper: "Aligner: One Global Token is Worth Millions of Parameters When Aligning Large Language
Models", Zhou, Wu, Zhu, Terzopoulos, arXiv 2312.05503. The base model stays frozen; this module
is everything that trains. model.py's Attention reads it through `prefix(layer)`:

    layer:   0     1     2     3    ...   L-1
    prefix:  -     -   (P,g2) (P,g3) ... (P,g_L-1)     P: tokens (N, D), shared by all layers
                                                        g_l: gates (H,), zero at the start

Trainable parameters: N*D + (L - start_layer)*H, e.g. 4096 + 30*32 = 5,056 for one token on
LLaMA-2-7B and 576 + 28*9 = 828 on SmolLM2-135M. With `per_layer=True` every layer gets its own
tokens instead: LLaMA-Adapter's design, the paper's main baseline, one line apart (see prefix).

Command line:
    python aligner.py inspect FILE      # our adapter or an official released checkpoint
    python aligner.py merge --adapter out.pt --out DIR [--format hf]
    python aligner.py compare A B
Read next: data.py (the instruction data), then generate.py and train.py.
"""
import argparse
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from cli import (UserError, atomic_save, atomic_write, check_output_dir, check_output_file, new_directory,
                 run_main)
from convert_weights import read_official_aligner, read_state, to_hf, write_params
from model import ModelArgs

FORMAT = "aligner-v1"


class Aligner(nn.Module):
    def __init__(self, args: ModelArgs, n_tokens: int = 1, start_layer: int = 2, per_layer=False,
                 meta=None):
        super().__init__()
        if n_tokens < 1:
            raise UserError(f"--tokens must be at least 1, got {n_tokens}")
        if not 0 <= start_layer < args.n_layers:
            raise UserError(f"--start-layer must be in 0..{args.n_layers - 1} for this "
                            f"{args.n_layers}-layer model, got {start_layer}")
        self.n_tokens, self.start_layer, self.per_layer = n_tokens, start_layer, per_layer
        self.dim, self.n_layers, self.n_heads = args.dim, args.n_layers, args.n_heads
        self.meta = dict(meta or {})  # plain facts saved with the file: base model, template, ...
        n_gated = args.n_layers - start_layer
        shape = (n_gated, n_tokens, args.dim) if per_layer else (n_tokens, args.dim)
        self.tokens = nn.Parameter(torch.randn(shape))  # N(0, 1), as nn.Embedding in the official code
        # zero gates: the model starts as exactly the base model, and learns how much to listen
        self.gates = nn.Parameter(torch.zeros(n_gated, args.n_heads))  # (L - s, H), used raw (no tanh)

    def prefix(self, layer: int):
        """(tokens (N, D), gate (H,)) for `layer`, or None below start_layer."""
        if layer < self.start_layer:
            return None
        i = layer - self.start_layer
        tokens = self.tokens[i] if self.per_layer else self.tokens  # the one line LLaMA-Adapter differs
        return tokens, self.gates[i]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_fits(self, args: ModelArgs, name="the model"):
        mine = (self.dim, self.n_layers, self.n_heads)
        if mine != (args.dim, args.n_layers, args.n_heads):
            raise UserError(f"this adapter is for a model with dim {mine[0]}, {mine[1]} layers, "
                            f"{mine[2]} heads, but {name} has dim {args.dim}, {args.n_layers} "
                            f"layers, {args.n_heads} heads: pick the base model it was trained on")

    def to_dict(self):
        return {"format": FORMAT, "tokens": self.tokens.detach().cpu(),
                "gates": self.gates.detach().cpu(), "config": self.config()}

    def config(self):
        return {"n_tokens": self.n_tokens, "start_layer": self.start_layer,
                "per_layer": self.per_layer, "dim": self.dim, "n_layers": self.n_layers,
                "n_heads": self.n_heads, **self.meta}

    def save(self, path):
        atomic_save(self.to_dict(), path)

    @classmethod
    def load(cls, path):
        """Our adapter file, a training checkpoint, or an official released Aligner checkpoint."""
        return cls.from_state(load_file(path), path)

    @classmethod
    def from_state(cls, d: dict, where="adapter"):
        """The Aligner in a loaded file's dict; anything else, or anything damaged, is a UserError."""
        if isinstance(d.get("aligner"), dict):
            d = d["aligner"]  # a training checkpoint (train.py --resume)
        if isinstance(d.get("format"), str) and d["format"] == FORMAT:
            return cls.from_dict(d, where)
        if any(isinstance(k, str) and k.endswith("attn.gating_factor") for k in d):
            tokens, gates, start, per_layer = read_official_aligner(d, where)
            meta = {"source": f"official: {Path(where).name}"}
            return cls.from_tensors(tokens, gates, start, per_layer, meta, where)
        raise UserError(f"{where}: this is a PyTorch file but not an Aligner adapter "
                        f"(none of its keys look like one)")

    @classmethod
    def from_dict(cls, d: dict, where="adapter"):
        """Our own format: tokens, gates and a config that must agree with them."""
        c, keys = d.get("config"), ("n_tokens", "start_layer", "per_layer", "dim", "n_layers", "n_heads")
        kinds = {k: bool if k == "per_layer" else int for k in keys}
        if not isinstance(c, dict) or any(type(c.get(k)) is not kind for k, kind in kinds.items()):
            raise UserError(f"{where}: its config is missing or damaged (it needs whole numbers "
                            f"{', '.join(keys[:2] + keys[3:])} and per_layer true or false)")
        meta = {k: v for k, v in c.items() if k not in keys}
        if any(not isinstance(k, str) or not isinstance(v, (str, int, float, bool)) for k, v in meta.items()):
            raise UserError(f"{where}: its config holds something other than names and plain values")
        a = cls.from_tensors(d.get("tokens"), d.get("gates"), c["start_layer"], c["per_layer"], meta, where)
        if [a.n_tokens, a.start_layer, a.per_layer, a.dim, a.n_layers, a.n_heads] != [c[k] for k in keys]:
            raise UserError(f"{where}: tensor shapes do not match its own config; the file is damaged")
        return a

    @classmethod
    def from_tensors(cls, tokens, gates, start_layer: int, per_layer: bool, meta: dict, where="adapter"):
        """An Aligner holding these tensors, once they are finite float tensors of agreeing shapes:
        tokens (N, D), or (L - s, N, D) per layer, and gates (L - s, H)."""
        for name, t, rank in (("tokens", tokens, 3 if per_layer else 2), ("gates", gates, 2)):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == rank and t.numel()):
                raise UserError(f"{where}: {name} is not a non-empty float tensor of rank {rank}; the file "
                                f"is damaged")
            if not torch.isfinite(t).all():
                raise UserError(f"{where}: {name} holds NaN or infinite values (from a run that "
                                f"diverged?); it cannot be used")
        (n_gated, n_heads), (n_tokens, dim) = gates.shape, tokens.shape[-2:]
        if per_layer and tokens.shape[0] != n_gated:
            raise UserError(f"{where}: {tokens.shape[0]} per-layer prompts for {n_gated} gated layers")
        args = ModelArgs(dim=dim, n_layers=start_layer + n_gated, n_heads=n_heads)
        aligner = cls(args, n_tokens, start_layer, per_layer, meta)
        aligner.load_state_dict({"tokens": tokens.float(), "gates": gates.float()})
        return aligner


def load_file(path):
    """torch.load with weights_only=True (adapter files come from strangers), errors as one line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the adapter file itself")
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a text file, a pickle with code in it: all refused alike
        raise UserError(f"{path}: cannot be read as PyTorch weights ({type(e).__name__}): not a "
                        f".pt/.pth file, truncated, or holding code that weights_only refuses") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: holds a {type(d).__name__}, not an Aligner adapter")
    return d


def inspect(path, plot=None):
    a = Aligner.load(path)
    sharing = "per layer (LLaMA-Adapter style)" if a.per_layer else "shared by all layers"
    out = [f"{path}",
           f"  tokens       {a.n_tokens} {sharing}",
           f"  base shape   dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads",
           f"  start layer  {a.start_layer} (gated layers {a.start_layer}..{a.n_layers - 1})",
           f"  trainable    {a.n_params():,} parameters"]
    out += [f"  {k:<12} {v}" for k, v in a.meta.items() if k in ("base", "source", "template", "mode")]
    norms = a.tokens.detach().float().norm(dim=-1).flatten()  # (N,) or (L - s) * N
    out.append(f"  token norm   mean {norms.mean():.2f} (sqrt(dim) = {a.dim ** 0.5:.2f})")
    g = a.gates.detach().abs()  # (L - s, H)
    top = g.max().item() or 1.0
    out.append("  layer  mean|g|   max|g|")
    for i, (mean, mx) in enumerate(zip(g.mean(1).tolist(), g.max(1).values.tolist())):
        out.append(f"  {a.start_layer + i:5d}  {mean:7.4f}  {mx:7.4f}  {'#' * round(30 * mean / top)}")
    print("\n".join(out))
    if plot:
        check_output_file(plot, [path])
        plot_gates(a, plot)


def merge(adapter, out, model=None, fmt="ours", force=False):
    """Fold a one-token Aligner into the base model's weights, exactly.

    With N = 1 the prefix softmax is over a single token, so its weight is 1 for every query and
    the prefix adds the same vector to every position: head h of layer l gets g_l[h] * (wv_l p)
    for the key/value head that h reads. After wo that is a constant bias, b_l = wo_l (g_l * wv_l p),
    on the attention output of each layer from start_layer on. The merged model computes exactly
    what base + Aligner computes, at exactly the base model's cost. For N > 1 the mixture of the N
    values depends on the query, so no such merge exists."""
    from safetensors.torch import save_file

    a = Aligner.load(adapter)
    if a.n_tokens != 1:
        raise UserError(f"{adapter} has {a.n_tokens} tokens: only a one-token Aligner merges exactly "
                        f"(with N > 1 the prefix softmax weights depend on each query, so the added "
                        f"vector is not a constant); keep using it as an adapter")
    if not model and not a.meta.get("base"):
        raise UserError(f"{adapter} records no base model: pass --model DIR")
    src = Path(model or a.meta["base"])
    if not model and not (src / "params.json").is_file():
        raise UserError(f"{adapter} was trained on {src}, which is not there: pass --model DIR")
    check_output_dir(out, [src, adapter], force)  # before any work
    args, state = read_state(src)
    a.check_fits(args, str(src))
    if args.wo_bias_from >= 0:
        raise UserError(f"{src} already has a merged Aligner; merge into the original base model")
    k_heads, g, e = args.n_kv_heads, args.n_heads // args.n_kv_heads, args.head_dim
    with torch.no_grad():
        for layer in range(a.start_layer, args.n_layers):
            tokens, gate = a.prefix(layer)  # (1, D), (H,)
            wv = state[f"layers.{layer}.attention.wv.weight"].float()  # (K*E, D)
            wo = state[f"layers.{layer}.attention.wo.weight"]  # (D, H*E)
            pv = (wv @ tokens[0].float()).view(k_heads, 1, e)  # (K, 1, E): the one prefix value
            per_head = gate.view(k_heads, g, 1) * pv  # (K, G, E): head h = kv head * G + group
            bias = wo.float() @ per_head.reshape(-1)  # (D,)
            state[f"layers.{layer}.attention.wo.bias"] = bias.to(wo.dtype)
    args.wo_bias_from = a.start_layer
    with new_directory(out, force, [src, adapter]) as tmp:
        if fmt == "hf":
            to_hf(args, state, src, tmp)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
            write_params(args, tmp / "params.json")
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy(src / name, tmp / name)
    print(f"wrote {out} ({'Hugging Face' if fmt == 'hf' else 'model.py'} format): {src.name} with "
          f"{Path(adapter).name} merged as a wo bias in layers {a.start_layer}..{args.n_layers - 1}")


def compare(path_a, path_b):
    """How alike two adapters are: cosine similarity of tokens and gates, and equal numbers."""
    a, b = Aligner.load(path_a), Aligner.load(path_b)
    print(f"A {path_a}: {a.n_tokens} token(s), {a.n_params():,} parameters\n"
          f"B {path_b}: {b.n_tokens} token(s), {b.n_params():,} parameters")
    for name in ("tokens", "gates"):
        x, y = getattr(a, name).detach().float(), getattr(b, name).detach().float()
        if x.shape != y.shape:
            print(f"  {name:<7} shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        cos = nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()
        rows = nn.functional.cosine_similarity(x.flatten(0, -2), y.flatten(0, -2), dim=-1)  # (rows,)
        equal = (x == y).float().mean().item()
        print(f"  {name:<7} cosine {cos:+.4f} (per {'token' if name == 'tokens' else 'layer'}: "
              f"min {rows.min():+.4f}, max {rows.max():+.4f}); exactly equal numbers {100 * equal:.1f}%")


def plot_gates(a, png):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    g = a.gates.detach().abs()  # (L - s, H)
    layers = list(range(a.start_layer, a.n_layers))
    n_panels = 2 if a.n_tokens > 1 and not a.per_layer else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(6 * n_panels, 4), squeeze=False)
    axes[0][0].plot(layers, g.mean(1), label="mean |g|")
    axes[0][0].plot(layers, g.max(1).values, label="max |g|")
    axes[0][0].set(xlabel="layer", ylabel="gate magnitude", title="Aligner gates per layer")
    axes[0][0].legend()
    if n_panels == 2:
        t = nn.functional.normalize(a.tokens.detach().float(), dim=-1)  # (N, D)
        im = axes[0][1].imshow(t @ t.T, vmin=-1, vmax=1, cmap="coolwarm")  # (N, N) cosine
        axes[0][1].set(title="token cosine similarity", xlabel="token", ylabel="token")
        fig.colorbar(im, ax=axes[0][1])
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))
    print(f"wrote {png}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    args = p.parse_args(argv)
    if args.cmd == "inspect":
        run_main(inspect, args.file, args.plot)
    elif args.cmd == "merge":
        run_main(merge, args.adapter, args.out, args.model, args.format, args.force)
    else:
        run_main(compare, args.a, args.b)


if __name__ == "__main__":
    main()
