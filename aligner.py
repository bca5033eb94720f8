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
Also here: `AlignerBatch` (a different Aligner for each row of one batch) and `merged_bias`, the
exact identity that folds a one-token Aligner into the base. Saving and loading adapter files is
support/adapter_file.py; `python adapter.py inspect|merge|compare` works on those files.
Read next: data.py (the instruction data), then generate.py and train.py.
"""
import torch
import torch.nn as nn

from model import ModelArgs


class Aligner(nn.Module):
    def __init__(self, args: ModelArgs, n_tokens: int = 1, start_layer: int = 2, per_layer=False,
                 meta=None):
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"--tokens must be at least 1, got {n_tokens}")
        if not 0 <= start_layer < args.n_layers:
            raise ValueError(f"--start-layer must be in 0..{args.n_layers - 1} for this "
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
        """The base model has this Aligner's shape, and no Aligner merged into it already (a ValueError,
        as model.py raises: the commands print it as one line, support/adapter_file.py `fitting`)."""
        mine = (self.dim, self.n_layers, self.n_heads)
        if mine != (args.dim, args.n_layers, args.n_heads):
            raise ValueError(f"this adapter is for a model with dim {mine[0]}, {mine[1]} layers, "
                             f"{mine[2]} heads, but {name} has dim {args.dim}, {args.n_layers} "
                             f"layers, {args.n_heads} heads: pick the base model it was trained on")
        if args.wo_bias_from >= 0:
            raise ValueError(f"{name} already has an Aligner merged into it (adapter.py merge): use it "
                             f"without an adapter, or the original base model")


class AlignerBatch(nn.Module):
    """Several Aligners over one frozen base, one per row of a batch, in one forward pass: model.py
    reads `prefix(layer)` as (tokens (B, N, D), gates (B, H)), gathered per row from stacked copies.
    Row index 0 is no Aligner: its gates are zero, so it adds exactly nothing and the row is the
    base model; so are the layers below an Aligner's own start layer. All share one token count."""

    def __init__(self, aligners: list, args: ModelArgs):
        super().__init__()
        if len({a.n_tokens for a in aligners}) > 1:
            raise ValueError("Aligners with different token counts go in separate batches")
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


@torch.no_grad()
def merged_bias(a: Aligner, layer: int, wv, wo, args: ModelArgs):
    """b_l = wo_l (g_l * wv_l p): what a one-token Aligner adds to the attention output of `layer`.

    With N = 1 the prefix softmax is over a single token, so its weight is 1 for every query and
    the prefix adds the same vector to every position: head h of layer l gets g_l[h] * (wv_l p)
    for the key/value head that h reads. After wo that is a constant bias on the attention output,
    so base + Aligner can be merged exactly into a base with that bias (adapter.py merge). For
    N > 1 the mixture of the N values depends on the query, so no such merge exists.
    wv (K*E, D) and wo (D, H*E) are that layer's weights; returns (D,) in float32."""
    k_heads, g, e = args.n_kv_heads, args.n_heads // args.n_kv_heads, args.head_dim
    tokens, gate = a.prefix(layer)  # (1, D), (H,)
    pv = (wv.float() @ tokens[0].float()).view(k_heads, 1, e)  # (K, 1, E): the one prefix value
    per_head = gate.float().view(k_heads, g, 1) * pv  # (K, G, E): head h = kv head * G + group
    return wo.float() @ per_head.reshape(-1)  # (D,)
