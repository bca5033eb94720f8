"""Does one token learn form but not knowledge? The paper's thesis, measured on SmolLM2-135M.

    python experiments/form_vs_knowledge.py            # full run, about 40 minutes on a 2-core CPU
    python experiments/form_vs_knowledge.py --quick    # a smoke run in about 2 minutes

Two tasks, each with training and held-out sets and an automatic metric:
  form       data/form_train.json: every answer is a letter ("Dear reader," ... "Yours, Aligner.");
             metric: share of held-out instructions (data/form_heldout.json) answered in that form.
  knowledge  invented people and the invented towns they live in (made below, so the base model
             cannot know them); held-out questions ask the same facts in new words;
             metric: share of answers that name the right town.
Methods, all on the same frozen base with the same steps, batch and data: Aligner with N = 1, 10
and 100 shared tokens; the per-layer LLaMA-Adapter variant (10 tokens per layer); and LoRA rank 8
on wq and wv (written here, not in the core). Writes results.md, results.json and, when
matplotlib is installed, plot.png to --out.
Read next: README.md, section "Form versus knowledge".
"""
import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import run_main  # noqa: E402
from convert_weights import load_model, model_dir  # noqa: E402
from data import Tokenizer, format_prompt  # noqa: E402
from generate import Sampling, answer  # noqa: E402
from train import TrainConfig, train  # noqa: E402

sys.path.insert(0, str(ROOT / "data"))
from make_form_data import follows_form  # noqa: E402


class LoRA(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen, A (r, in) random and B (out, r) zero at start."""

    def __init__(self, base: nn.Linear, r=8, alpha=16):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.a = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))  # (r, in)
        self.b = nn.Parameter(torch.zeros(base.out_features, r))  # (out, r)

    def forward(self, x):
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale  # (..., out)


def knowledge_data(n_people: int, seed=9):
    """Invented people and towns: (train records, held-out (question, town) pairs)."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "mir", "ven", "tha", "dru", "sel", "quo", "ra", "bex", "ul", "tor", "fen", "ish", "ga"]

    def word(n):
        return "".join(rng.choice(syl) for _ in range(n)).capitalize()

    people = {f"{word(2)} {word(3)}": word(3) for _ in range(n_people)}
    records, held = [], []
    for person, town in people.items():
        records.append({"instruction": f"Where does {person} live?", "output": f"{person} lives in {town}."})
        records.append({"instruction": f"What is the home town of {person}?",
                        "output": f"The home town of {person} is {town}."})
        held.append((f"Which town is home to {person}?", town))
        held.append((f"Tell me the name of the place where {person} lives.", town))
    return records, held


def form_data(n_heldout):
    records = json.loads((ROOT / "data" / "form_train.json").read_text())
    held = [r["instruction"] for r in json.loads((ROOT / "data" / "form_heldout.json").read_text())]
    return records, held[:n_heldout]


def add_lora(model) -> list:
    """Wrap wq and wv of every layer in LoRA; returns the LoRA parameters."""
    params = []
    for layer in model.layers:
        for name in ("wq", "wv"):
            wrapped = LoRA(getattr(layer.attention, name))
            setattr(layer.attention, name, wrapped)
            params += [wrapped.a, wrapped.b]
    return params


def remove_lora(model):
    for layer in model.layers:
        for name in ("wq", "wv"):
            m = getattr(layer.attention, name)
            if isinstance(m, LoRA):
                setattr(layer.attention, name, m.base)


def run(method, model, path, data_file, args):
    """Train one method through train.py's loop; return (Aligner or None, trainable count, seconds).
    LoRA trains its own parameters there, with no Aligner."""
    torch.manual_seed(args.seed)
    kind, n = method
    params = add_lora(model) if kind == "lora" else None
    cfg = TrainConfig(data=str(data_file), model=str(path), out=None, tokens=n, per_layer=kind == "per-layer",
                      max_steps=args.steps, batch_size=args.batch, micro_batch_size=args.batch,
                      lr=args.lora_lr if kind == "lora" else args.lr, warmup_steps=0, max_seq_len=256,
                      val_fraction=0.0, eval_every=0, save_every=0, seed=args.seed, quiet=True)
    t0 = time.time()
    aligner = train(cfg, model, params)
    n_params = sum(p.numel() for p in params) if params else aligner.n_params()
    return aligner, n_params, time.time() - t0


def score(model, tok, aligner, task, held, quick):
    """Share of held-out prompts answered right: in the letter form, or naming the right town."""
    if task == "form":
        greedy = Sampling(max_new_tokens=4 if quick else 40, temperature=0.0, top_k=0)
        hits = [follows_form(answer(model, tok, format_prompt(q), aligner, greedy)) for q in held]
    else:
        greedy = Sampling(max_new_tokens=4 if quick else 16, temperature=0.0, top_k=0)
        hits = [town.lower() in answer(model, tok, format_prompt(q), aligner, greedy).lower() for q, town in held]
    return sum(hits) / len(hits)


NAMES = {"aligner": "Aligner N={}", "per-layer": "LLaMA-Adapter ({} per layer)", "lora": "LoRA r={} (wq, wv)"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="a reduced smoke run (a few steps, a few prompts)")
    p.add_argument("--steps", type=int, help="optimizer steps per method (default 60; --quick 2)")
    p.add_argument("--batch", type=int, default=8, help="examples per step")
    p.add_argument("--lr", type=float, default=9e-3, help="Aligner learning rate")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--out", default="runs/form_vs_knowledge", help="where the table and plot go")
    args = p.parse_args()
    args.steps = args.steps or (2 if args.quick else 60)
    args.batch = 2 if args.quick else args.batch
    run_main(experiment, args)


def experiment(args):
    n_eval = 2 if args.quick else 32
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = model_dir(None)
    model, tok = load_model(path), Tokenizer(path)
    tasks = {"form": form_data(n_eval), "knowledge": knowledge_data(4 if args.quick else 40)}
    tasks["knowledge"] = (tasks["knowledge"][0], tasks["knowledge"][1][: n_eval * 2])
    results = [{"method": "base model (no training)", "params": 0, "form_s": 0, "knowledge_s": 0,
                **{task: score(model, tok, None, task, held, args.quick) for task, (_, held) in tasks.items()}}]
    with tempfile.TemporaryDirectory() as scratch:
        results += grid(model, tok, path, tasks, args, scratch)
    write_results(results, out, args, len(tasks["form"][1]), len(tasks["knowledge"][1]), time.time() - t_start)


def grid(model, tok, path, tasks, args, scratch) -> list:
    """A result row for every method: trained on each task, scored on its held-out questions."""
    results = []
    for method in [("aligner", 1), ("aligner", 10), ("aligner", 100), ("per-layer", 10), ("lora", 8)]:
        row = {"method": NAMES[method[0]].format(method[1])}
        for task, (records, held) in tasks.items():
            data_file = Path(scratch) / f"{task}_train.json"  # train.py reads its records from a file
            data_file.write_text(json.dumps(records, indent=1) + "\n")
            aligner, n_params, seconds = run(method, model, path, data_file, args)
            with torch.no_grad():
                hits = score(model, tok, aligner, task, held, args.quick)
            remove_lora(model)
            row.update({"params": n_params, task: hits, f"{task}_s": round(seconds, 1)})
            print(f"{row['method']:<30} {task:<10} {100 * hits:5.1f}%  ({n_params:,} params, "
                  f"{seconds:.0f} s training)", flush=True)
        results.append(row)
    return results


def write_results(results, out, args, n_form, n_know, seconds):
    lines = [f"{args.steps} steps of {args.batch} examples per method and task; {n_form} held-out "
             f"form instructions, {n_know} held-out knowledge questions; total {seconds:.0f} s",
             "", "| method | trainable parameters | form compliance | knowledge accuracy | training s (form / knowledge) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['params']:,} | {100 * r['form']:.1f}% | {100 * r['knowledge']:.1f}% | "
              f"{r['form_s']} / {r['knowledge_s']} |" for r in results]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    trained = results[1:]
    for task, marker in (("form", "o"), ("knowledge", "s")):
        ax.scatter([r["params"] for r in trained], [100 * r[task] for r in trained], marker=marker, label=task)
        for r in trained:
            ax.annotate(r["method"].split(" (")[0], (r["params"], 100 * r[task]), fontsize=7)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="held-out score (%)",
           title="SmolLM2-135M: form vs knowledge")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plot.png")
    print(f"wrote {out / 'results.md'} and {out / 'plot.png'}")


if __name__ == "__main__":
    main()
