"""What the commands print and draw: an Aligner's numbers in words (adapter.py inspect, compare),
and what train.py says about a run before it starts.

    python adapter.py inspect out.pt --plot gates.png
    python adapter.py compare a.pt b.pt

Each function takes a loaded Aligner (aligner.py): the token count and sharing, the parameter
count, the token norms, and the gates layer by layer, as a table with bars, or drawn. Skim it.
Read next: ../tests/ (what each part is checked against).
"""
import torch.nn.functional as F

from support.errors import UserError
from support.temporary import atomic_write


def describe(a, path) -> str:
    """Shape, parameter count, metadata, token norms, and the gates per layer with bars."""
    sharing = "per layer (LLaMA-Adapter style)" if a.per_layer else "shared by all layers"
    out = [f"{path}",
           f"  tokens       {a.n_tokens} {sharing}",
           f"  base shape   dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads",
           f"  start layer  {a.start_layer} (gated layers {a.start_layer}..{a.n_layers - 1})",
           f"  trainable    {a.n_params():,} parameters"]
    out += [f"  {k:<12} {v}" for k, v in a.meta.items() if k in ("base", "source", "template", "mode")]
    norms = a.tokens.detach().float().norm(dim=-1).flatten()  # (N,) or ((L - s) * N,)
    out.append(f"  token norm   mean {norms.mean():.2f} (sqrt(dim) = {a.dim ** 0.5:.2f})")
    g = a.gates.detach().abs()  # (L - s, H)
    top = g.max().item() or 1.0
    out.append("  layer  mean|g|   max|g|")
    for i, (mean, mx) in enumerate(zip(g.mean(1).tolist(), g.max(1).values.tolist())):
        out.append(f"  {a.start_layer + i:5d}  {mean:7.4f}  {mx:7.4f}  {'#' * round(30 * mean / top)}")
    return "\n".join(out)


def describe_run(run, cfg, path, data) -> str:
    """What train.py says before its loop: the model, the Aligner, the data and the schedule."""
    a, n_layers, weight = run.aligner, run.model.args.n_layers, run.model.output.weight
    return "\n".join([
        f"model {path} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M parameters, frozen) on "
        f"{run.ranks.device}, {str(weight.dtype).removeprefix('torch.')}",
        f"Aligner: {a.n_tokens} token(s){' per layer' if a.per_layer else ''}, layers {a.start_layer}.."
        f"{n_layers - 1}: {a.n_params():,} trainable parameters",
        f"data {cfg.data}: {len(run.train_set)} train, {len(run.val)} validation examples; {data.truncated} "
        f"truncated to {cfg.max_seq_len} tokens, {data.dropped} dropped (no response token left)",
        f"{run.total} optimizer steps of {cfg.batch_size} examples ({cfg.batch_size // cfg.micro_batch_size}"
        f" x {cfg.micro_batch_size}), warmup {run.warmup}, lr {cfg.lr} {cfg.schedule}, "
        f"{run.ranks.world} process(es)"])


def compare(a, b, name_a, name_b) -> str:
    """How alike two adapters are: cosine similarity of tokens and gates, and equal numbers."""
    out = [f"A {name_a}: {a.n_tokens} token(s), {a.n_params():,} parameters",
           f"B {name_b}: {b.n_tokens} token(s), {b.n_params():,} parameters"]
    for name in ("tokens", "gates"):
        x, y = getattr(a, name).detach().float(), getattr(b, name).detach().float()
        if x.shape != y.shape:
            out.append(f"  {name:<7} shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        cos = F.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()
        rows = F.cosine_similarity(x.flatten(0, -2), y.flatten(0, -2), dim=-1)  # (rows,)
        equal = (x == y).float().mean().item()
        out.append(f"  {name:<7} cosine {cos:+.4f} (per {'token' if name == 'tokens' else 'layer'}: "
                   f"min {rows.min():+.4f}, max {rows.max():+.4f}); exactly equal numbers {100 * equal:.1f}%")
    return "\n".join(out)


def plot_gates(a, png):
    """The gates per layer (mean and max over heads) and, for several shared tokens, their cosines."""
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
        t = F.normalize(a.tokens.detach().float(), dim=-1)  # (N, D)
        im = axes[0][1].imshow(t @ t.T, vmin=-1, vmax=1, cmap="coolwarm")  # (N, N) cosine
        axes[0][1].set(title="token cosine similarity", xlabel="token", ylabel="token")
        fig.colorbar(im, ax=axes[0][1])
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))
    print(f"wrote {png}")
