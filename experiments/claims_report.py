"""The tables and figures of experiments/form_vs_knowledge.py, from its finished cells.

    python experiments/form_vs_knowledge.py            # runs the cells, then calls `write` below

Cells of the same task, method, learning rate and start layer differ only by seed; a table entry is
their mean +- the sample standard deviation (over 3 seeds by default), each figure's error bar the
same. Each method is shown at its best learning rate (the lowest validation loss of the seed-1 grid
at the main budget); the grid itself is a second table, the knowledge learning curve a third. Every
proportion also gets a Wilson 95% interval, every difference the verdict names (NAMED) Newcombe's,
and the paper's win/loss counts a sign test; the figures draw chance lines and seed (or Wilson) bands.
Writes OUT/results.md, OUT/results.json, and with matplotlib OUT/grid.png, OUT/curves.png,
OUT/start_layer.png and OUT/gates.png (the trained form Aligner's gates and merged biases beside the
official LLaMA-2-7B one-token Aligner's gates).
Read next: docs/claims.md.
"""
import json
import math
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
         "per-layer": "LLaMA-Adapter ({} per layer)", "lora": "LoRA r={} (every projection)",
         "lora-qv": "LoRA r={} (wq, wv)"}
FIELDS = ("score", "score_reuse", "score_new", "recall", "val_score", "val_loss")  # a cell's scores


def spread(values: list) -> tuple:
    """(mean, sample standard deviation; 0 for one value) of the non-missing values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def at(row: dict) -> dict:
    """The scores of a cell at its last checkpoint."""
    return row["at"][-1]


# ---- intervals: every proportion and every named difference gets one -------------------------------
Z = 1.959964  # the 97.5% point of the normal: 95% two-sided intervals


def wilson(k: int, n: int) -> tuple:
    """The Wilson score 95% interval of a proportion k/n (right at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + Z * Z / n
    centre, half = (p + Z * Z / (2 * n)) / d, Z * (p * (1 - p) / n + Z * Z / (4 * n * n)) ** 0.5 / d
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple:
    """Newcombe's hybrid score 95% interval of p1 - p2 for two independent proportions (method 10)."""
    (p1, p2), (l1, u1), (l2, u2) = (k1 / n1, k2 / n2), wilson(k1, n1), wilson(k2, n2)
    d = p1 - p2
    return d - ((p1 - l1) ** 2 + (u2 - p2) ** 2) ** 0.5, d + ((u1 - p1) ** 2 + (p2 - l2) ** 2) ** 0.5


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of wins against losses (ties dropped): the chance of a split at least
    this uneven if each non-tied question were a fair coin."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def hits(rows: list, field: str, n: int, step=None) -> tuple:
    """(hits, questions) of `field` pooled over `rows` (seeds), at `step` or the last checkpoint;
    n: the questions in one cell's probe set."""
    points = [at(r) if step is None else next(a for a in r["at"] if a["step"] == step) for r in rows]
    return sum(round(p[field] * n) for p in points), n * len(points)


def ci_text(k: int, n: int) -> str:
    low, high = wilson(k, n)
    return f"{k}/{n} = {100 * k / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def cell_text(rows: list, field: str, percent=True) -> str:
    mean, sd = spread([at(r).get(field) for r in rows])
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}%" if percent else f"{mean:.3f} ± {sd:.3f}"


class Results:
    """The cells of one run, sorted into what the tables need."""

    def __init__(self, rows: list, best: list):
        self.rows = rows
        self.methods = list(dict.fromkeys((r["method"], r["n"]) for r in rows))
        self.best = {(b["task"], b["method"], b["n"]): b["lr"] for b in best}

    def cells(self, task, method, n, lr=None, start=2, seed=None, curve=False) -> list:
        """The cells of a method at a start layer (and learning rate, seed); curves or single budgets."""
        return [r for r in self.rows
                if (r["task"], r["method"], r["n"], r["start"]) == (task, method, n, start)
                and (lr is None or r["lr"] == lr) and (seed is None or r["seed"] == seed)
                and (len(r["checkpoints"]) > 1) == curve]

    def grid(self, task, method, n) -> dict:
        """{lr: the seed-1 cell at the main budget} of the method's learning-rate grid."""
        return {r["lr"]: r for r in self.cells(task, method, n, seed=0 if method == "base" else 1)}

    def best_lr(self, task, method, n) -> float:
        """The learning rate the experiment chose (form_vs_knowledge.best_lr); 0 for the base model."""
        return self.best.get((task, method, n), 0.0)

    def main(self, task, method, n) -> list:
        """The cells at the best learning rate, every seed."""
        return self.cells(task, method, n, self.best_lr(task, method, n))


def main_table(res: Results) -> list:
    lines = ["| method | trainable parameters | form lr | form compliance | reusing a training template "
             "| new | form val loss | knowledge lr | held-out accuracy | training recall "
             "| knowledge val loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, n in res.methods:
        f, k = res.main("form", method, n), res.main("knowledge", method, n)
        lrs = ["-" if method == "base" else f"{res.best_lr(t, method, n):g}" for t in ("form", "knowledge")]
        lines.append(f"| {NAMES[method].format(n)} | {f[0]['params']:,} | {lrs[0]} | "
                     f"{cell_text(f, 'score')} | "
                     f"{cell_text(f, 'score_reuse')} | {cell_text(f, 'score_new')} | "
                     f"{cell_text(f, 'val_loss', False)} | {lrs[1]} | {cell_text(k, 'score')} | "
                     f"{cell_text(k, 'recall')} | {cell_text(k, 'val_loss', False)} |")
    return lines


def grid_table(res: Results) -> list:
    """Every learning rate of each method's grid on both tasks; '-' where that cell is not run yet."""
    lines = ["| method | lr | form val loss | form compliance | knowledge val loss | validation accuracy "
             "| held-out accuracy | training recall |", "|---|---|---|---|---|---|---|---|"]
    for method, n in res.methods:
        if method == "base":
            continue
        grids = {t: res.grid(t, method, n) for t in ("form", "knowledge")}
        for lr in sorted(set(grids["form"]) | set(grids["knowledge"])):
            form = grid_cell(grids["form"].get(lr), res.best_lr("form", method, n) == lr, ("score",))
            knowledge = grid_cell(grids["knowledge"].get(lr), res.best_lr("knowledge", method, n) == lr,
                                  ("val_score", "score", "recall"))
            lines.append(f"| {NAMES[method].format(n)} | {lr:g} | " + " | ".join(form + knowledge) + " |")
    return lines


def grid_cell(row, best: bool, scores: tuple) -> tuple:
    """(val loss, bold where chosen, then each of `scores` in %) of one grid cell; '-'s before it runs."""
    if row is None:
        return ("-",) * (1 + len(scores))
    a = at(row)
    loss = f"**{a['val_loss']:.3f}**" if best else f"{a['val_loss']:.3f}"
    return (loss, *(f"{100 * a[k]:.1f}%" for k in scores))


def selection_table(res: Results) -> list:
    """Knowledge, seed 1: the learning rate the validation loss picks (the rule fixed in advance) beside
    the one the validation accuracy would pick (ties to the lower loss), with what each scores."""
    lines = ["| method | by validation loss: lr, held-out, recall "
             "| by validation accuracy: lr, held-out, recall |", "|---|---|---|"]
    for method, n in res.methods:
        if method == "base":
            continue
        grid = res.grid("knowledge", method, n)
        by_loss = res.best_lr("knowledge", method, n)
        by_score = min(grid, key=lambda lr: (-at(grid[lr])["val_score"], at(grid[lr])["val_loss"]))
        picks = [f"{lr:g}, {100 * at(grid[lr])['score']:.1f}%, {100 * at(grid[lr])['recall']:.1f}%"
                 for lr in (by_loss, by_score)]
        lines.append(f"| {NAMES[method].format(n)} | {picks[0]} | {picks[1]} |")
    return lines


def curves(res: Results, other_rule=False) -> list:
    """[(method, n, lr, rows)] of the knowledge learning curves at the learning rate the validation loss
    chose (every seed run there; before any is, the curves at another rate), seed 1 first; with
    `other_rule`, those at another learning rate (the validation accuracy's pick)."""
    out = []
    for method, n in res.methods:
        chosen = res.best_lr("knowledge", method, n)
        rows = res.cells("knowledge", method, n, curve=True)
        rows = ([r for r in rows if r["lr"] != chosen] if other_rule
                else [r for r in rows if r["lr"] == chosen] or rows)
        rows = sorted((r for r in rows if r["lr"] == rows[0]["lr"]), key=lambda r: r["seed"])
        if rows:
            out.append((method, n, rows[0]["lr"], rows))
    return out


def rule_table(res: Results, sizes: dict) -> list:
    """The knowledge curves at the learning rate the validation accuracy picks, where it is another than
    the loss rule's, beside the loss rule's curves: held-out hits of every seed pooled at each step, and
    the difference at the last step with Newcombe's 95% interval."""
    held, loss_rule = sizes["knowledge"]["score"], {(m, n): rows for m, n, _, rows in curves(res)}
    lines = ["| method | seeds | lr: loss rule -> accuracy rule | held-out at each step, loss rule -> "
             "accuracy rule | last step: accuracy rule - loss rule [95%] |", "|---|---|---|---|---|"]
    for m, n, lr, rows in curves(res, other_rule=True):
        base = loss_rule.get((m, n), [])
        if not base:
            continue
        steps = [a["step"] for a in rows[0]["at"]]
        (k1, n1), (k2, n2) = hits(rows, "score", held, steps[-1]), hits(base, "score", held, steps[-1])
        low, high = newcombe(k1, n1, k2, n2)
        shown = ", ".join(f"{s}: {hits(base, 'score', held, s)[0]} -> {hits(rows, 'score', held, s)[0]}"
                          for s in steps)
        lines.append(f"| {NAMES[m].format(n)} | {len(base)} -> {len(rows)} | {base[0]['lr']:g} -> {lr:g} | "
                     f"{shown} (of {n2} -> {n1}) | {100 * (k1 / n1 - k2 / n2):+.1f} [{100 * low:+.1f}, "
                     f"{100 * high:+.1f}] |")
    return lines


def mean_at(rows: list, field: str, i: int) -> float:
    """The mean over seeds of `field` at the i-th checkpoint."""
    return sum(r["at"][i][field] for r in rows) / len(rows)


def curve_table(res: Results) -> list:
    found = curves(res)
    if not found:
        return ["(no curve: the run had one knowledge checkpoint)"]
    steps = [a["step"] for a in found[0][3][0]["at"]]
    lines = ["| method | lr | seeds | " + " | ".join(f"step {s}: recall / held-out / val loss" for s in steps)
             + " |", "|---|---|---|" + "---|" * len(steps)]
    lines += [f"| {NAMES[m].format(n)} | {lr:g} | {len(rows)} | " + " | ".join(
        f"{100 * mean_at(rows, 'recall', i):.0f}% / {100 * mean_at(rows, 'score', i):.0f}% / "
        f"{mean_at(rows, 'val_loss', i):.2f}" for i in range(len(steps))) + " |" for m, n, lr, rows in found]
    return lines


def sweep(res: Results) -> list:
    """[(start, rows)] of the one-token form Aligner at its best learning rate, by start layer."""
    lr = res.best_lr("form", "aligner", 1)
    starts = sorted({r["start"] for r in res.rows
                     if (r["task"], r["method"], r["n"]) == ("form", "aligner", 1)})
    return [(s, res.cells("form", "aligner", 1, lr, start=s)) for s in starts]


def sweep_table(res: Results, n_layers: int) -> list:
    lines = ["| start layer s | gated layers | trainable parameters | form compliance | form val loss |",
             "|---|---|---|---|---|"]
    lines += [f"| {s} | {n_layers - s} | {rows[0]['params']:,} | {cell_text(rows, 'score')} | "
              f"{cell_text(rows, 'val_loss', False)} |" for s, rows in sweep(res)]
    return lines


# The differences the verdict names: (label, task, A, B, field, step); A and B are (method, n), or
# ("start", s) for the one-token form Aligner at start layer s; step None: the main table's cells at
# each method's best learning rate, every seed pooled; a step: the knowledge curve's cell there.
NAMED = [("form: LoRA r=1 (wq, wv) - Aligner N=100, matched size", "form", ("lora-qv", 1), ("aligner", 100),
          "score", None),
         ("form: LLaMA-Adapter - Aligner N=1", "form", ("per-layer", 10), ("aligner", 1), "score", None),
         ("form: LoRA r=8 - Aligner N=1", "form", ("lora", 8), ("aligner", 1), "score", None),
         ("form: Aligner N=100 - N=1", "form", ("aligner", 100), ("aligner", 1), "score", None),
         ("form: Aligner N=1 - N=10", "form", ("aligner", 1), ("aligner", 10), "score", None),
         *[(f"form, Aligner N={n}: reusing a template - new", "form", ("aligner", n), ("aligner", n),
            ("score_reuse", "score_new"), None) for n in (1, 10, 100)],
         ("form, LLaMA-Adapter: reusing a template - new", "form", ("per-layer", 10), ("per-layer", 10),
          ("score_reuse", "score_new"), None),
         *[(f"form: start layer 2 - start layer {s}", "form", ("start", 2), ("start", s), "score", None)
           for s in (0, 4, 8, 16)],
         ("knowledge held-out: LoRA r=1 (wq, wv) - Aligner N=100", "knowledge", ("lora-qv", 1),
          ("aligner", 100), "score", None),
         ("knowledge recall: LoRA r=1 (wq, wv) - Aligner N=100", "knowledge", ("lora-qv", 1),
          ("aligner", 100), "recall", None),
         ("knowledge recall: Aligner N=10 - N=1", "knowledge", ("aligner", 10), ("aligner", 1), "recall",
          None),
         ("knowledge recall: Aligner N=100 - N=10", "knowledge", ("aligner", 100), ("aligner", 10), "recall",
          None),
         ("curve, step 400, held-out: LoRA r=1 (wq, wv) - Aligner N=100, matched size", "knowledge",
          ("lora-qv", 1), ("aligner", 100), "score", 400),
         ("curve, step 400, held-out: LoRA r=3 (wq, wv) - LLaMA-Adapter, matched size", "knowledge",
          ("lora-qv", 3), ("per-layer", 10), "score", 400),
         ("curve, step 400, held-out: Aligner N=10 - N=100", "knowledge", ("aligner", 10), ("aligner", 100),
          "score", 400),
         ("curve, step 400, held-out: Aligner N=10 - N=1", "knowledge", ("aligner", 10), ("aligner", 1),
          "score", 400),
         ("curve, step 400, held-out: Aligner N=10 - LLaMA-Adapter", "knowledge", ("aligner", 10),
          ("per-layer", 10), "score", 400),
         *[(f"curve, step 400, held-out: Aligner N=10 - {NAMES[m].format(r)}", "knowledge", ("aligner", 10),
            (m, r), "score", 400) for m, r in (("lora", 8), ("lora-qv", 1), ("lora-qv", 3))]]
# The paper's GPT-4-judged Vicuna counts of the Aligner against a competitor: (base, competitor, N, Aligner
# wins, losses, ties), as the official README's figure shows them (docs/claims.md, "The paper beside us").
PAPER = [("LLaMA-2-7B", "LLaMA-Adapter", 1, 26, 35, 19), ("LLaMA-2-7B", "LLaMA-Adapter", 10, 28, 26, 26),
         ("LLaMA-2-7B", "LoRA", 1, 20, 26, 34), ("LLaMA-2-7B", "LoRA", 10, 26, 25, 29),
         ("LLaMA-2-13B", "LLaMA-Adapter", 1, 22, 28, 30), ("LLaMA-2-13B", "LLaMA-Adapter", 10, 27, 27, 26),
         ("LLaMA-2-13B", "LoRA", 1, 16, 31, 33), ("LLaMA-2-13B", "LoRA", 10, 21, 28, 31)]


def named_rows(res: Results, task: str, who: tuple, step) -> list:
    if who[0] == "start":
        return res.cells(task, "aligner", 1, res.best_lr(task, "aligner", 1), start=who[1])
    if step is None:
        return res.main(task, *who)
    rows = next((rows for m, n, _, rows in curves(res) if (m, n) == who), [])
    return [r for r in rows if any(a["step"] == step for a in r["at"])]


def interval_table(res: Results, sizes: dict) -> list:
    """Each method at its best learning rate: hits / questions over every seed, with a Wilson 95%
    interval (the seeds' questions pooled, as if independent: no seed-to-seed spread is in it)."""
    columns = [("form", "score"), ("form", "score_reuse"), ("form", "score_new"), ("knowledge", "score"),
               ("knowledge", "recall")]
    lines = ["| method | form compliance | reusing a template | new | knowledge held-out | training recall |",
             "|---|---|---|---|---|---|"]
    for method, n in res.methods:
        texts = [ci_text(*hits(res.main(t, method, n), f, sizes[t][f])) if f in sizes[t] else "-"
                 for t, f in columns]  # "-": a group no probe of this run falls in (--quick keeps 2)
        lines.append(f"| {NAMES[method].format(n)} | " + " | ".join(texts) + " |")
    return lines


def curve_interval_table(res: Results, sizes: dict) -> list:
    """The knowledge curves: hits / questions at each checkpoint, the seeds pooled, with Wilson 95%
    intervals."""
    held, recall = sizes["knowledge"]["score"], sizes["knowledge"]["recall"]
    lines = ["| method | lr | seeds | step | held-out (32 a seed) | training recall (64 a seed) |",
             "|---|---|---|---|---|---|"]
    for m, n, lr, rows in curves(res):
        lines += [f"| {NAMES[m].format(n)} | {lr:g} | {len(rows)} | {a['step']} | "
                  f"{ci_text(*hits(rows, 'score', held, a['step']))} | "
                  f"{ci_text(*hits(rows, 'recall', recall, a['step']))} |" for a in rows[0]["at"]]
    return lines


def named_table(res: Results, sizes: dict, named=NAMED) -> list:
    """Every difference the verdict names, with Newcombe's 95% interval ('yes' where it excludes 0), and
    whether every seed of A lies on the same side of every seed of B (the interval pools the questions
    of all seeds, so the seed-to-seed spread is not in it)."""
    lines = ["| difference (A - B) | A | B | A - B [95% interval] | interval excludes 0 | seeds apart |",
             "|---|---|---|---|---|---|"]
    for label, task, a, b, field, step in named:
        fields = field if isinstance(field, tuple) else (field, field)
        rows = [named_rows(res, task, who, step) for who in (a, b)]
        if not all(rows) or not all(f in sizes[task] for f in fields):
            continue
        (k1, n1), (k2, n2) = (hits(r, f, sizes[task][f], step) for r, f in zip(rows, fields))
        low, high = newcombe(k1, n1, k2, n2)
        lines.append(f"| {label} | {ci_text(k1, n1)} | {ci_text(k2, n2)} | {100 * (k1 / n1 - k2 / n2):+.1f} "
                     f"[{100 * low:+.1f}, {100 * high:+.1f}] | {'yes' if low > 0 or high < 0 else 'no'} | "
                     f"{seeds_apart(rows, fields, step)} |")
    return lines


def cell_of(row: dict) -> tuple:
    """Which cell a row is: form_vs_knowledge.key's fields but the budget's (a folder has one budget)."""
    return tuple(json.dumps(row[k]) for k in ("task", "method", "n", "start", "seed", "lr", "checkpoints"))


def kernel_check(res: Results, repeats: list, sizes: dict, best: list) -> list:
    """results.md's kernel check: each cell that experiments/repeat_cell.py --record trained again
    (OUT/repeats.jsonl: the same cell under another attention kernel) beside the design's, then the
    knowledge curves' step-400 intervals and the differences named there with the new draws in place
    of the old: how far the verdict moves when those cells are drawn again."""
    if not repeats:
        return []
    again = {cell_of(r): r for r in repeats}
    done = [(r, again[cell_of(r)]) for r in res.rows if cell_of(r) in again]
    swapped = Results([again.get(cell_of(r), r) for r in res.rows], best)
    held, recall = sizes["knowledge"]["score"], sizes["knowledge"]["recall"]
    lines = ["## The kernel check: cells trained again under another attention kernel (OUT/repeats.jsonl)",
             "", "Each cell below was trained again by `experiments/repeat_cell.py --record` (same data, "
             "seed and learning rate; another kernel, one thread). Held-out hits of 32 and training recall "
             "of 64 at each checkpoint, then -> now.", "",
             "| cell | kernel then -> now | " + " | ".join(f"step {a['step']}: held-out / recall"
                                                           for a in done[0][0]["at"]) + " |",
             "|---|---|" + "---|" * len(done[0][0]["at"])]
    lines += [f"| {NAMES[old['method']].format(old['n'])}, {old['task']}, lr {old['lr']:g}, seed "
              f"{old['seed']} | {old.get('attention', '?')} -> {new['attention']} | " + " | ".join(
                  f"{round(a['score'] * held)} -> {round(b['score'] * held)} / "
                  f"{round(a['recall'] * recall)} -> {round(b['recall'] * recall)}"
                  for a, b in zip(old["at"], new["at"])) + " |" for old, new in done]
    lines += ["", "The knowledge curves at step 400 with those cells in place of the design's (seeds "
              "pooled, Wilson 95%):", "",
              "| method | lr | seeds | held-out (32 a seed) | training recall (64 a seed) |",
              "|---|---|---|---|---|"]
    lines += [f"| {NAMES[m].format(n)} | {lr:g} | {len(rows)} | {ci_text(*hits(rows, 'score', held, 400))} | "
              f"{ci_text(*hits(rows, 'recall', recall, 400))} |" for m, n, lr, rows in curves(swapped)
              if any(a["step"] == 400 for a in rows[0]["at"])]
    return lines + ["", "The differences named at step 400, with those cells in place of the design's:", "",
                    *named_table(swapped, sizes, [n for n in NAMED if n[5] == 400]), ""]


def seeds_apart(rows: list, fields: tuple, step) -> str:
    """'yes' if every seed of A scores above every seed of B (or every one below), 'no' if not, '1 seed'."""
    if min(len(r) for r in rows) < 2:
        return "1 seed"
    a, b = ([(at(r) if step is None else r["at"][-1])[f] for r in side] for side, f in zip(rows, fields))
    return "yes" if min(a) > max(b) or max(a) < min(b) else "no"


def paper_table() -> list:
    lines = ["| base | competitor | Aligner N | wins / losses / ties | score (wins + ties / 2) / 80 "
             "| sign test, wins vs losses: p |", "|---|---|---|---|---|---|"]
    lines += [f"| {base} | {rival} | {n} | {w} / {lo} / {t} | {(w + t / 2) / (w + lo + t):.3f} | "
              f"{sign_test(w, lo):.3f} |" for base, rival, n, w, lo, t in PAPER]
    return lines


def by_layer(res: Results, attention: list) -> dict:
    """The trained one-token form Aligner (start 2) per layer: mean |gate| over heads and the merged
    bias norm, each as (mean, sd) over seeds, beside the base model's mean |attention output|
    (`attention`, one per layer); and the official 7B Aligner's mean and max |gate|."""
    rows = res.main("form", "aligner", 1)
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


def sizes_of(info: dict) -> dict:
    """{task: {score field: questions in one cell}}: the probe sets, and the groups a set is split by."""
    return {t: {**probes, **info.get("groups", {}).get(t, {})} for t, probes in info["probes"].items()}


def intervals_text(res: Results, sizes: dict) -> list:
    return ["## Intervals: hits / questions, Wilson 95% (each method at its best lr, seeds pooled)",
            "", *interval_table(res, sizes), "",
            "## Intervals on the knowledge curves (the seeds run so far pooled: the interval is over the "
            "questions; the seed-to-seed spread is not in it)", "",
            *curve_interval_table(res, sizes), "",
            "## Named differences, Newcombe 95% intervals (the questions of every seed pooled)", "",
            *named_table(res, sizes), "",
            "## The paper's GPT-4-judged counts: Aligner wins / losses / ties, 80 Vicuna questions", "",
            *paper_table(), ""]


def write(rows: list, out: Path, settings: dict, n_layers: int, info: dict, attention: list, design: dict,
          check=(), repeats=()):
    """results.md and results.json from the cells' rows, then the figures; `info` has the probe counts
    and the chance scores, `attention` the base model's mean |attention output| per layer (the scale
    of the merged biases), `design` the methods, learning-rate grids and the learning rates chosen,
    `check` the lines that say how the cells meet experiments/design.json, `repeats` the cells trained
    again (OUT/repeats.jsonl) for the kernel check."""
    res, seconds = Results(rows, design["best"]), sum(r["seconds"] for r in rows)
    layers = by_layer(res, attention)
    chance = ", ".join(f"{k} {100 * v:.2f}%" for k, v in info["chance"].items())
    text = [f"Settings: {json.dumps(settings)}",
            f"Learning-rate grids: {json.dumps(design['lr_grid'])}",
            f"{len(rows)} cells; probes: {json.dumps(info['probes'])}; the cells' training and scoring took "
            f"{seconds:.0f} s in all (summed over workers).",
            f"Chance on knowledge (a model that always names the same city): {chance}.", "", *check,
            "## Each method at its best learning rate (lowest validation loss; start layer 2)", "",
            *main_table(res), "", *intervals_text(res, sizes_of(info)),
            "## The learning-rate grid (seed 1; the best in bold)", "", *grid_table(res), "",
            "## Knowledge: the learning rate by validation loss (used) and by validation accuracy (seed 1)",
            "", *selection_table(res), "",
            "## Knowledge learning curves (the mean over the seeds run so far, at the learning rate the "
            "validation loss chose at the main budget)", "",
            *curve_table(res), "", "## Knowledge curves at the validation accuracy's learning rate, where it "
            "picks another (hits of the seeds' held-out questions pooled)", "",
            *rule_table(res, sizes_of(info)), "",
            *kernel_check(res, list(repeats), sizes_of(info), design["best"]),
            "## Start layer of the one-token Aligner (form task)", "",
            *sweep_table(res, n_layers), "",
            "## The trained one-token form Aligner per layer (start layer 2, SmolLM2, form task)", "",
            "Gate: mean over heads of |g_l[h]|. Merged bias: |b_l| = |wo_l (g_l * wv_l p)|, what the",
            "token adds to every position's attention output (aligner.merged_bias). Base attention output:",
            "the mean norm of that output over the held-out form prompts, without the Aligner.", "",
            *layer_table(layers)]
    atomic_write(out / "results.md", lambda f: f.write(("\n".join(text) + "\n").encode()))
    summary = {"settings": settings, "design": design, "info": info, "seconds": seconds, "by_layer": layers,
               "attention": attention,
               "main": [{"task": t, "method": m, "n": n, "params": res.main(t, m, n)[0]["params"],
                         "lr": res.best_lr(t, m, n), "seeds": len(res.main(t, m, n)),
                         **{f: spread([at(r).get(f) for r in res.main(t, m, n)]) for f in FIELDS}}
                        for t in ("form", "knowledge") for m, n in res.methods],
               "curves": [{"method": m, "n": n, "lr": lr, "seeds": [r["seed"] for r in rows],
                           "at": [r["at"] for r in rows]} for m, n, lr, rows in curves(res)]}
    atomic_write(out / "results.json", lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
    print("\n".join(text))
    plot(res, layers, out, info)


def plot(res: Results, layers: dict, out: Path, info: dict):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no figures")
        return
    fig, ax = plt.subplots(figsize=(9, 4.2))
    series = (("form", "score", "o"), ("knowledge", "score", "s"), ("knowledge", "recall", "^"))
    for task, field, marker in series:
        trained = [(res.main(task, m, n)[0]["params"], spread([at(r)[field] for r in res.main(task, m, n)]),
                    NAMES[m].format(n).split(" (")[0]) for m, n in res.methods if m != "base"]
        ax.errorbar([p for p, _, _ in trained], [100 * ms[0] for _, ms, _ in trained],
                    yerr=[100 * ms[1] for _, ms, _ in trained], fmt=marker, capsize=3,
                    label=f"{task} {'held-out' if field == 'score' else 'training recall'}")
        for p, ms, name in trained if field == "score" else []:
            ax.annotate(name, (p, 100 * ms[0]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    chance = 100 * info["chance"].get("score", 0.0)
    ax.axhline(chance, color="grey", ls=":", label=f"knowledge chance ({chance:.2f}%); form: base 0%")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="score (%), mean ± sd over seeds",
           title="SmolLM2-135M: form vs knowledge, each at its best lr", xlim=(400, 1e7), ylim=(-5, 108))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside the axes: it hides no point
    save(fig, out / "grid.png")
    plot_curves(plt, res, out, info)
    plot_sweep(plt, res, out)
    plot_layers(plt, layers, out)


def curve_band(rows: list, field: str, n: int) -> tuple:
    """(steps, mean %, low %, high %) of one method's curve: the range over seeds where there are several,
    else the Wilson 95% interval of the one run's hits out of n questions."""
    steps = [a["step"] for a in rows[0]["at"]]
    values = [[100 * a[field] for a in r["at"]] for r in rows]  # seeds x steps
    mean = [sum(col) / len(col) for col in zip(*values)]
    if len(rows) > 1:
        return steps, mean, [min(col) for col in zip(*values)], [max(col) for col in zip(*values)]
    bounds = [wilson(round(v * n / 100), n) for v in values[0]]
    return steps, mean, [100 * lo for lo, _ in bounds], [100 * hi for _, hi in bounds]


def plot_curves(plt, res: Results, out: Path, info: dict):
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.9), sharey=True)
    sizes, chance = sizes_of(info)["knowledge"], info["chance"]
    for ax, field, title in ((axes[0], "recall", "training questions (fit)"),
                             (axes[1], "score", "held-out paraphrases (transfer)")):
        for m, n, lr, rows in curves(res):
            steps, mean, low, high = curve_band(rows, field, sizes[field])
            line = ax.plot(steps, mean, "o-", label=f"{NAMES[m].format(n)} ({len(rows)} seed"
                           f"{'s' if len(rows) > 1 else ''})")[0]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.12)
        ax.axhline(100 * chance.get(field, 0.0), color="grey", ls=":", label="chance (one city always)")
        ax.set(xscale="log", xlabel="optimizer steps (8 examples each)", ylabel="right city (%)", title=title)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Knowledge on SmolLM2-135M by budget; bands: the range over seeds, or with one seed the "
                 "Wilson 95% interval over the questions", fontsize=9)
    save(fig, out / "curves.png")


def plot_sweep(plt, res: Results, out: Path):
    points = sweep(res)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((axes[0], "score", "form compliance (%)", 100), (axes[1], "val_loss", "val loss", 1))
    for ax, field, label, scale in panels:
        stats = [spread([at(r)[field] for r in rows]) for _, rows in points]
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
