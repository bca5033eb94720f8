"""The tables and figures of experiments/form_vs_knowledge.py, from its finished cells.

    python experiments/form_vs_knowledge.py            # runs the cells, then calls `write` below

Cells of the same task, method and start layer differ only by seed; each table entry is their
mean +- the sample standard deviation (over 3 seeds by default), each figure's error bar the same.
Writes OUT/results.md, OUT/results.json, and with matplotlib OUT/grid.png, OUT/start_layer.png and
OUT/gates.png (the trained form Aligner's gates and merged biases beside the official LLaMA-2-7B
one-token Aligner's gates).
Read next: README.md, section "What the paper claims, measured".
"""
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from support.adapter_file import load_aligner  # noqa: E402
from support.temporary import atomic_write  # noqa: E402

OFFICIAL = ROOT.parent / "shared" / "official_aligner" / \
    "aligner1Token-llama2-7B-lr0.009bs64weightDecay0.02wu2-epoch-8.0-valloss0.9565.pth"
NAMES = {"base": "base model (no training)", "aligner": "Aligner N={}",
         "per-layer": "LLaMA-Adapter ({} per layer)", "lora": "LoRA r={} (every projection)"}


def spread(values: list) -> tuple:
    """(mean, sample standard deviation; 0 for one value) of the non-missing values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def groups(rows: list) -> dict:
    """{(task, method, n, start): [rows over seeds]}, in the order the cells ran."""
    out = {}
    for r in rows:
        out.setdefault((r["task"], r["method"], r["n"], r["start"]), []).append(r)
    return out


def cell_text(rows, field, percent=True) -> str:
    mean, sd = spread([r[field] for r in rows] if rows else [])
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}%" if percent else f"{mean:.3f} ± {sd:.3f}"


def grid_table(g: dict) -> list:
    lines = ["| method | trainable parameters | form compliance | form val loss | knowledge accuracy |",
             "|---|---|---|---|---|"]
    for (task, method, n, start), rows in g.items():
        if task != "form" or start != 2:
            continue
        knowledge = g.get(("knowledge", method, n, start), [])
        lines.append(f"| {NAMES[method].format(n)} | {rows[0]['params']:,} | {cell_text(rows, 'score')} | "
                     f"{cell_text(rows, 'val_loss', False)} | {cell_text(knowledge, 'score')} |")
    return lines


def sweep(g: dict) -> list:
    """[(start, rows)] of the one-token form Aligner, by start layer."""
    return sorted((start, rows) for (task, method, n, start), rows in g.items()
                  if task == "form" and method == "aligner" and n == 1)


def sweep_table(g: dict, n_layers: int) -> list:
    lines = ["| start layer s | gated layers | trainable parameters | form compliance | form val loss |",
             "|---|---|---|---|---|"]
    lines += [f"| {s} | {n_layers - s} | {rows[0]['params']:,} | {cell_text(rows, 'score')} | "
              f"{cell_text(rows, 'val_loss', False)} |" for s, rows in sweep(g)]
    return lines


def by_layer(g: dict, attention: list) -> dict:
    """The trained one-token form Aligner (start 2) per layer: mean |gate| over heads and the merged
    bias norm, each as (mean, sd) over seeds, beside the base model's mean |attention output|
    (`attention`, one per layer); and the official 7B Aligner's mean and max |gate|."""
    rows = g.get(("form", "aligner", 1, 2), [])
    gates = [[sum(map(abs, heads)) / len(heads) for heads in r["gates"]] for r in rows]  # seeds x layers
    out = {"layers": list(range(2, 2 + len(gates[0]))) if gates else [],
           "gate": [spread(list(col)) for col in zip(*gates)],
           "bias_norm": [spread(list(col)) for col in zip(*[r["bias_norms"] for r in rows])]}
    out["attention_norm"] = attention[2:2 + len(out["layers"])]
    if OFFICIAL.exists():
        official = load_aligner(OFFICIAL)
        magnitude = official.gates.detach().abs()  # (L - s, H)
        out["official"] = {"start": official.start_layer, "mean": magnitude.mean(1).tolist(),
                           "max": magnitude.max(1).values.tolist()}
    return out


def layer_table(layers: dict) -> list:
    lines = ["| layer | mean gate magnitude | merged bias norm | base attention-output norm "
             "| bias / attention |",
             "|---|---|---|---|---|"]
    lines += [f"| {layer} | {g[0]:.4f} ± {g[1]:.4f} | {b[0]:.1f} ± {b[1]:.1f} | {a:.1f} | {b[0] / a:.2f} |"
              for layer, g, b, a in zip(layers["layers"], layers["gate"], layers["bias_norm"],
                                        layers["attention_norm"])]
    return lines


def write(rows: list, out: Path, settings: dict, n_layers: int, n_held: dict, attention: list):
    """results.md and results.json from the cells' rows, then the figures; `attention` is the base
    model's mean |attention output| per layer (the scale of the merged biases)."""
    g, seconds = groups(rows), sum(r["seconds"] for r in rows)
    layers = by_layer(g, attention)
    text = [f"Settings: {json.dumps(settings)}",
            f"{len(rows)} cells; {n_held['form']} held-out form instructions, {n_held['knowledge']} held-out "
            f"knowledge questions; the cells' training and scoring took {seconds:.0f} s in all.", "",
            "## Form and knowledge by method (start layer 2)", "", *grid_table(g), "",
            "## Start layer of the one-token Aligner (form task)", "", *sweep_table(g, n_layers), "",
            "## The trained one-token form Aligner per layer (start layer 2, SmolLM2, form task)", "",
            "Gate: mean over heads of |g_l[h]|. Merged bias: |b_l| = |wo_l (g_l * wv_l p)|, what the",
            "token adds to every position's attention output (aligner.merged_bias). Base attention output:",
            "the mean norm of that output over the held-out form prompts, without the Aligner.", "",
            *layer_table(layers)]
    atomic_write(out / "results.md", lambda f: f.write(("\n".join(text) + "\n").encode()))
    summary = {"settings": settings, "seconds": seconds, "by_layer": layers,  # the rows: cells.jsonl
               "groups": [{"task": k[0], "method": k[1], "n": k[2], "start": k[3], "params": v[0]["params"],
                           "score": spread([r["score"] for r in v]),
                           "val_loss": spread([r["val_loss"] for r in v]),
                           "seeds": len(v)} for k, v in g.items()]}
    atomic_write(out / "results.json", lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
    print("\n".join(text))
    plot(g, layers, out)


def plot(g: dict, layers: dict, out: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figures")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for task, marker in (("form", "o"), ("knowledge", "s")):
        trained = [(rows[0]["params"], spread([r["score"] for r in rows]), NAMES[m].format(n).split(" (")[0])
                   for (t, m, n, s), rows in g.items() if t == task and s == 2 and m != "base"]
        ax.errorbar([p for p, _, _ in trained], [100 * ms[0] for _, ms, _ in trained],
                    yerr=[100 * ms[1] for _, ms, _ in trained], fmt=marker, capsize=3, label=task)
        for p, ms, name in trained:
            ax.annotate(name, (p, 100 * ms[0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="held-out score (%), mean ± sd over seeds",
           title="SmolLM2-135M: form vs knowledge")
    ax.legend()
    save(fig, out / "grid.png")
    plot_sweep(plt, g, out)
    plot_layers(plt, layers, out)


def plot_sweep(plt, g: dict, out: Path):
    points = sweep(g)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((axes[0], "score", "form compliance (%)", 100), (axes[1], "val_loss", "val loss", 1))
    for ax, field, label, scale in panels:
        stats = [spread([r[field] for r in rows]) for _, rows in points]
        ax.errorbar([s for s, _ in points], [scale * m for m, _ in stats],
                    yerr=[scale * sd for _, sd in stats], fmt="o-", capsize=3)
        ax.set(xlabel="start layer s (layers below s do not see the token)", ylabel=label)
    fig.suptitle("One-token Aligner on SmolLM2-135M, by start layer (mean ± sd over seeds)")
    save(fig, out / "start_layer.png")


def plot_layers(plt, layers: dict, out: Path):
    if not layers["layers"]:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    axes[0].errorbar(layers["layers"], [m for m, _ in layers["gate"]], yerr=[sd for _, sd in layers["gate"]],
                     fmt="o-", capsize=2)
    axes[0].set(xlabel="layer", ylabel="mean |gate| over heads", title="SmolLM2-135M, trained form Aligner")
    if "official" in layers:
        o = layers["official"]
        xs = list(range(o["start"], o["start"] + len(o["mean"])))
        axes[1].plot(xs, o["mean"], "o-", label="mean |gate| over heads")
        axes[1].plot(xs, o["max"], ".--", label="max |gate| over heads")
        axes[1].legend()
    axes[1].set(xlabel="layer", title="LLaMA-2-7B, official one-token Aligner")
    axes[2].errorbar(layers["layers"], [m for m, _ in layers["bias_norm"]],
                     yerr=[sd for _, sd in layers["bias_norm"]], fmt="o-", capsize=2,
                     label="merged bias |b_l|")
    axes[2].plot(layers["layers"], layers["attention_norm"], "s--", label="base attention output (mean norm)")
    axes[2].set(xlabel="layer", ylabel="norm", title="the bias it merges into (SmolLM2)")
    axes[2].legend()
    save(fig, out / "gates.png")


def save(fig, png: Path):
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))
    print(f"wrote {png}")
