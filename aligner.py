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
from pathlib import Path

import torch
import torch.nn as nn

import report
from cli import UserError, atomic_save, check_output_dir, check_output_file, run_main
from convert_weights import read_official_aligner, read_state, write_checkpoint
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
        """The base model has this Aligner's shape, and no Aligner merged into it already."""
        mine = (self.dim, self.n_layers, self.n_heads)
        if mine != (args.dim, args.n_layers, args.n_heads):
            raise UserError(f"this adapter is for a model with dim {mine[0]}, {mine[1]} layers, "
                            f"{mine[2]} heads, but {name} has dim {args.dim}, {args.n_layers} "
                            f"layers, {args.n_heads} heads: pick the base model it was trained on")
        if args.wo_bias_from >= 0:
            raise UserError(f"{name} already has an Aligner merged into it (aligner.py merge): use it "
                            f"without an adapter, or the original base model")

    def to_dict(self):
        return {"format": FORMAT, "tokens": self.tokens.detach().cpu(),
                "gates": self.gates.detach().cpu(), "config": self.config()}

    def config(self):
        return {"n_tokens": self.n_tokens, "start_layer": self.start_layer,
                "per_layer": self.per_layer, "dim": self.dim, "n_layers": self.n_layers,
                "n_heads": self.n_heads, **self.meta}

    def save(self, path):
        atomic_save(self.to_dict(), path)

    def base(self, model=None, where="the adapter") -> Path:
        """The base model directory: `model` when given, else the one the adapter was trained on."""
        if model:
            return Path(model)
        if not isinstance(self.meta.get("base"), str):
            raise UserError(f"{where} records no base model: pass --model DIR")
        if not (Path(self.meta["base"]) / "params.json").is_file():
            raise UserError(f"{where} was trained on {self.meta['base']}, which is not there: pass --model "
                            f"DIR")
        return Path(self.meta["base"])

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


class AlignerBatch(nn.Module):
    """Several Aligners over one frozen base, one per row of a batch, in one forward pass: model.py
    reads `prefix(layer)` as (tokens (B, N, D), gates (B, H)), gathered per row from stacked copies.
    Row index 0 is no Aligner: its gates are zero, so it adds exactly nothing and the row is the
    base model; so are the layers below an Aligner's own start layer. All share one token count."""

    def __init__(self, aligners: list, args: ModelArgs):
        super().__init__()
        if len({a.n_tokens for a in aligners}) > 1:
            raise UserError("Aligners with different token counts go in separate batches")
        n = aligners[0].n_tokens if aligners else 1
        self.start_layer = min((a.start_layer for a in aligners), default=args.n_layers)
        tokens = torch.zeros(len(aligners) + 1, args.n_layers, n, args.dim)  # (A + 1, L, N, D)
        gates = torch.zeros(len(aligners) + 1, args.n_layers, args.n_heads)  # (A + 1, L, H)
        for j, a in enumerate(aligners, 1):
            a.check_fits(args)
            for layer in range(a.start_layer, args.n_layers):
                tokens[j, layer], gates[j, layer] = (t.detach() for t in a.prefix(layer))
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("gates", gates, persistent=False)
        self.register_buffer("rows", torch.zeros(1, dtype=torch.long), persistent=False)  # (B,)

    def use(self, rows: list):
        """Which Aligner each row of the next batch uses: 0 for none, j for the j-th. Written in
        place when the batch size stays, so a compiled decoding step sees the same tensor."""
        rows = torch.tensor(rows, device=self.tokens.device)  # (B,)
        if rows.shape == self.rows.shape:
            self.rows.copy_(rows)
        else:
            self.rows = rows

    def prefix(self, layer: int):
        if layer < self.start_layer:
            return None
        return self.tokens[self.rows, layer], self.gates[self.rows, layer]  # (B, N, D), (B, H)


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
    print(report.describe(a, path))
    if plot:
        check_output_file(plot, [path])
        report.plot_gates(a, plot)


@torch.no_grad()
def merged_bias(a: Aligner, layer: int, wv, wo, args: ModelArgs):
    """b_l = wo_l (g_l * wv_l p): what a one-token Aligner adds to the attention output of `layer`
    (see `merge`). wv (K*E, D) and wo (D, H*E) are that layer's weights; returns (D,) in float32."""
    k_heads, g, e = args.n_kv_heads, args.n_heads // args.n_kv_heads, args.head_dim
    tokens, gate = a.prefix(layer)  # (1, D), (H,)
    pv = (wv.float() @ tokens[0].float()).view(k_heads, 1, e)  # (K, 1, E): the one prefix value
    per_head = gate.float().view(k_heads, g, 1) * pv  # (K, G, E): head h = kv head * G + group
    return wo.float() @ per_head.reshape(-1)  # (D,)


def merge(adapter, out, model=None, fmt="ours", force=False):
    """Fold a one-token Aligner into the base model's weights, exactly.

    With N = 1 the prefix softmax is over a single token, so its weight is 1 for every query and
    the prefix adds the same vector to every position: head h of layer l gets g_l[h] * (wv_l p)
    for the key/value head that h reads. After wo that is a constant bias, b_l = wo_l (g_l * wv_l p),
    on the attention output of each layer from start_layer on. The merged model computes exactly
    what base + Aligner computes, at exactly the base model's cost. For N > 1 the mixture of the N
    values depends on the query, so no such merge exists."""
    a = Aligner.load(adapter)
    if a.n_tokens != 1:
        raise UserError(f"{adapter} has {a.n_tokens} tokens: only a one-token Aligner merges exactly "
                        f"(with N > 1 the prefix softmax weights depend on each query, so the added "
                        f"vector is not a constant); keep using it as an adapter")
    src = a.base(model, adapter)
    check_output_dir(out, [src, adapter], force)  # before any work
    args, state = read_state(src)
    a.check_fits(args, str(src))
    for layer in range(a.start_layer, args.n_layers):
        wo = state[f"layers.{layer}.attention.wo.weight"]  # (D, H*E)
        bias = merged_bias(a, layer, state[f"layers.{layer}.attention.wv.weight"], wo, args)  # (D,)
        state[f"layers.{layer}.attention.wo.bias"] = bias.to(wo.dtype)
    args.wo_bias_from = a.start_layer
    write_checkpoint(args, state, src, out, fmt, force, sources=[src, adapter])
    print(f"wrote {out} ({'Hugging Face' if fmt == 'hf' else 'model.py'} format): {src.name} with "
          f"{Path(adapter).name} merged as a wo bias in layers {a.start_layer}..{args.n_layers - 1}")


def compare(path_a, path_b):
    print(report.compare(Aligner.load(path_a), Aligner.load(path_b), path_a, path_b))


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
