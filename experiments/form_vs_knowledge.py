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
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner import Aligner  # noqa: E402
from generate import answer, format_prompt, model_dir  # noqa: E402
from model import Tokenizer, load_model  # noqa: E402
from train import batch_indices, collate, encode_example, sft_loss  # noqa: E402

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
    train, held = [], []
    for person, town in people.items():
        train.append({"instruction": f"Where does {person} live?", "output": f"{person} lives in {town}."})
        train.append({"instruction": f"What is the home town of {person}?", "output": f"The home town of {person} is {town}."})
        held.append((f"Which town is home to {person}?", town))
        held.append((f"Tell me the name of the place where {person} lives.", town))
    return train, held


def form_data(n_heldout):
    train = json.loads((ROOT / "data" / "form_train.json").read_text())
    held = [r["instruction"] for r in json.loads((ROOT / "data" / "form_heldout.json").read_text())]
    return train, held[:n_heldout]


def run(method, model, tok, train_records, args):
    """Train one method on the records; return (adapter or None, trainable count, seconds)."""
    torch.manual_seed(args.seed)
    kind, n = method
    lora = []
    if kind == "lora":
        for layer in model.layers:
            for name in ("wq", "wv"):
                wrapped = LoRA(getattr(layer.attention, name))
                setattr(layer.attention, name, wrapped)
                lora.append(wrapped)
        params = [p for m in lora for p in (m.a, m.b)]
        aligner = None
    else:
        aligner = Aligner(model.args, n, per_layer=kind == "per-layer")
        params = list(aligner.parameters())
    examples = [e for r in train_records
                if (e := encode_example(tok, format_prompt(r["instruction"]), r["output"], 256, False))]
    opt = torch.optim.AdamW(params, lr=args.lora_lr if kind == "lora" else args.lr, weight_decay=0.02)
    t0 = time.time()
    for step in range(args.steps):
        idx = batch_indices(len(examples), args.batch, step, args.seed)
        loss = sft_loss(model, aligner, *collate([examples[i] for i in idx], tok.eos_id, "cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return aligner, lora, sum(p.numel() for p in params), time.time() - t0


def unwrap_lora(model):
    for layer in model.layers:
        for name in ("wq", "wv"):
            m = getattr(layer.attention, name)
            if isinstance(m, LoRA):
                setattr(layer.attention, name, m.base)


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
    if args.quick:
        args.batch = 2
    n_eval = 2 if args.quick else 32
    t_start = time.time()
    path = model_dir(None)
    model, tok = load_model(path), Tokenizer(path)
    tasks = {"form": form_data(n_eval), "knowledge": knowledge_data(4 if args.quick else 40)}
    methods = [("aligner", 1), ("aligner", 10), ("aligner", 100), ("per-layer", 10), ("lora", 8)]
    gen = SimpleNamespace(seed=args.seed, temperature=0.0, top_k=0, top_p=1.0)
    results = []
    for method in methods:
        row = {"method": {"aligner": f"Aligner N={method[1]}", "per-layer": "LLaMA-Adapter (10 per layer)",
                          "lora": "LoRA r=8 (wq, wv)"}[method[0]]}
        for task, (train_records, held) in tasks.items():
            aligner, lora, n_params, seconds = run(method, model, tok, train_records, args)
            with torch.no_grad():
                if task == "form":
                    gen.max_new_tokens = 4 if args.quick else 40
                    hits = [follows_form(answer(model, tok, format_prompt(q), aligner, gen)) for q in held]
                else:
                    gen.max_new_tokens = 4 if args.quick else 16
                    hits = [town.lower() in answer(model, tok, format_prompt(q), aligner, gen).lower()
                            for q, town in held[: n_eval * 2]]
            unwrap_lora(model)
            row.update({"params": n_params, f"{task}": sum(hits) / len(hits), f"{task}_s": round(seconds, 1)})
            print(f"{row['method']:<30} {task:<10} {100 * sum(hits) / len(hits):5.1f}%  ({n_params:,} params, "
                  f"{seconds:.0f} s training)", flush=True)
        results.append(row)
    with torch.no_grad():  # the base model alone, for reference
        gen.max_new_tokens = 4 if args.quick else 40
        base_form = sum(follows_form(answer(model, tok, format_prompt(q), None, gen)) for q in tasks["form"][1])
        gen.max_new_tokens = 4 if args.quick else 16
        kheld = tasks["knowledge"][1][: n_eval * 2]
        base_know = sum(t.lower() in answer(model, tok, format_prompt(q), None, gen).lower() for q, t in kheld)
    results.insert(0, {"method": "base model (no training)", "params": 0, "form": base_form / len(tasks["form"][1]),
                       "knowledge": base_know / len(kheld), "form_s": 0, "knowledge_s": 0})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{args.steps} steps of {args.batch} examples per method and task; {len(tasks['form'][1])} held-out "
             f"form instructions, {len(kheld)} held-out knowledge questions; total {time.time() - t_start:.0f} s",
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
