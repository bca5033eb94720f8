"""What adapter.py prints and draws: an Aligner's numbers in words (inspect, compare).

    python adapter.py inspect out.pt --plot gates.png
    python adapter.py compare a.pt b.pt

Each function takes a loaded Aligner (aligner.py): the token count and sharing, the parameter
count, the token norms, and the gates layer by layer, as a table with bars, or drawn. Skim it.
Read next: ../tests/ (what each part is checked against).
"""
import math

import torch
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


def compare(a, b, name_a, name_b, init=None, stored=("float32", "float32")) -> str:
    """How alike two adapters are: cosine similarity of tokens and gates, equal numbers, and the token
    numbers number by number (token_numbers): `init` the Aligner both started from, if known;
    `stored` the dtypes the two files hold their tokens in."""
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
    return "\n".join(out + token_numbers(a, b, init, stored))


TOLERANCES = (1e-3, 1e-2, 1e-1)  # |a - b| at most this: the tokens start N(0, 1), so 0.1% to 10% of one sd
MAGNITUDES = ((0, 0.5), (0.5, 1), (1, 2), (2, float("inf")))  # |a| bins for the share of equal numbers


def rows_of(a):
    return a.tokens.detach().float().reshape(-1, a.dim)  # (N, D), or ((L - s) * N, D) per layer


def token_numbers(a, b, init=None, stored=("float32", "float32")) -> list:
    """The prefix-token numbers of A and B side by side: the share exactly equal as stored (in bfloat16
    if either file holds bfloat16) and once both are rounded to bfloat16, the share within each of
    TOLERANCES, and with `init` (the start both came from, rounded as each file is stored) what moved.
    Token rows of different counts compare the leading rows both have."""
    x, y = rows_of(a), rows_of(b)  # (Ra, D), (Rb, D)
    if x.shape[1] != y.shape[1]:
        return [f"  numbers  tokens {x.shape[1]} and {y.shape[1]} wide: not comparable number by number"]
    k = min(len(x), len(y))
    x, y = x[:k], y[:k]  # (k, D) each: the leading rows both have
    share = lambda mask: f"{100 * mask.float().mean().item():.1f}%"  # noqa: E731
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731  (k, D): rounded as bfloat16 holds it
    kept = [bf16 if dtype == "bfloat16" else (lambda t: t) for dtype in stored]  # a file's own rounding
    same = bf16(x) == bf16(y) if "bfloat16" in stored else x == y  # (k, D): equal as stored
    rows = f" (the first {k} token rows of {len(rows_of(a))} and {len(rows_of(b))})"
    out = [f"  numbers  {x.numel():,} token numbers compared"
           + (rows if len(rows_of(a)) != len(rows_of(b)) else ""),
           f"  exactly equal as stored ({stored[0]} / {stored[1]}) {share(same)}; both rounded to bfloat16 "
           f"{share(bf16(x) == bf16(y))}",
           "  within |a - b| <= " + ", ".join(f"{t:g}: {share((x - y).abs() <= t)}" for t in TOLERANCES),
           "  exactly equal by |a| (bfloat16's spacing doubles at each power of 2): " + ", ".join(
               f"[{lo:g}, {hi:g}) {share(same[(x.abs() >= lo) & (x.abs() < hi)])}"
               for lo, hi in MAGNITUDES if ((x.abs() >= lo) & (x.abs() < hi)).any())]
    if init is None:
        return out
    start = rows_of(init)[:k]  # (k, D)
    if start.shape != x.shape:
        return out + [f"  --init  its tokens are {tuple(rows_of(init).shape)}: not the start of these"]
    dx, dy = x - kept[0](start), y - kept[1](start)  # (k, D) each: the change from where each began
    return out + moved(dx, dy, share, (dx == 0) & (dy == 0))


def moved(dx, dy, share, both) -> list:
    """A's and B's changes from their shared start (each (k, D)): the share of numbers unchanged, and the
    dimensions that move most, compared between A and B."""
    mx, my = dx.abs().mean(0), dy.abs().mean(0)  # (D,) mean |change| of each dimension
    d, top = len(mx), max(1, len(mx) // 10)
    hot_x, hot_y = set(mx.topk(top).indices.tolist()), set(my.topk(top).indices.tolist())
    shared = len(hot_x & hot_y)
    tail = sum(math.comb(top, i) * math.comb(d - top, top - i)  # P(overlap >= shared) if independent
               for i in range(shared, top + 1)) / math.comb(d, top)
    return [f"  from the start (--init): unchanged exactly A {share(dx == 0)}, B {share(dy == 0)}, both "
            f"{share(both)}; mean |change| A {dx.abs().mean():.4f}, B {dy.abs().mean():.4f}",
            f"  dimensions that move most (top {top} of {d} by mean |change|): {shared} shared by A and B, "
            f"{top * top / d:.1f} expected by chance (hypergeometric p = {tail:.2g}); rank correlation "
            f"of the per-dimension change {spearman(mx, my):+.2f}"]


def spearman(u, v) -> float:
    """Spearman's rank correlation of two (D,) vectors (ties broken by position)."""
    ru, rv = u.argsort().argsort().float(), v.argsort().argsort().float()  # (D,) ranks
    ru, rv = ru - ru.mean(), rv - rv.mean()  # (D,) centred
    return (ru @ rv / (ru.norm() * rv.norm())).item()


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
