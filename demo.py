"""The paper's "form" claim, made visible on a laptop CPU in under ten minutes.

    make demo            # or: python demo.py [--seconds 300] [--tokens 1] [--template chat]

1. converts the embedded default model (SmolLM2-135M-Instruct) on first use;
2. trains a one-token Aligner (828 numbers) on data/form_train.json, where every answer is a
   little letter: "Dear reader," / one sentence / "Yours, Aligner." (training is capped by wall
   time, since CPU speed varies);
3. answers the held-out instructions of data/form_heldout.json (other topics, other wording)
   with the base model and with the Aligner, greedy, and prints how many follow the form, and
   three answers side by side.

Read next: bench.py (speed against the peers), then experiments/form_vs_knowledge.py.
"""
import argparse
import importlib.util
import json
import textwrap
import time
from pathlib import Path

from tqdm import tqdm

from aligner import AlignerBatch
from data import Prompt, prompt_ids
from generate import Sampling, generate_batch
from support.chat import Chat, template_of
from support.convert import model_dir
from support.errors import run_main
from support.flags import QUANTIZE, Runtime, path_text, positive_float, positive_int, random_seed
from train import TrainConfig, train

DATA = Path(__file__).resolve().parent / "data"


def form_check():
    """follows_form(text) and its description, from the data set's own definition."""
    spec = importlib.util.spec_from_file_location("make_form_data", DATA / "make_form_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.follows_form, f"starts with {mod.OPEN!r}, ends with {mod.CLOSE!r}, with a body between"


def side_by_side(left, right, width=38):
    a, b = textwrap.wrap(left, width) or [""], textwrap.wrap(right, width) or [""]
    rows = max(len(a), len(b))
    a, b = a + [""] * (rows - len(a)), b + [""] * (rows - len(b))
    return "\n".join(f"  {x:<{width}} | {y}" for x, y in zip(a, b))


def demo(args):
    """Train, then answer the held-out instructions with and without the Aligner."""
    t0 = time.time()
    follows_form, rule = form_check()
    path = model_dir(None)
    run = train(TrainConfig(data=str(DATA / "form_train.json"), model=str(path), out=args.out,
                            tokens=args.tokens, batch_size=8, micro_batch_size=8, lr=9e-3,
                            warmup_steps=10, schedule="cosine", max_steps=args.steps, max_time=args.seconds,
                            eval_every=50, eval_batches=2, val_fraction=0.05, save_every=0, seed=args.seed,
                            template=args.template),
                Runtime(device="cpu", quantize=args.quantize))
    model, tok, aligner = run.model, run.tok, run.aligner
    t_train = time.time() - t0
    held = [r["instruction"] for r in json.loads((DATA / "form_heldout.json").read_text())[: args.limit]]
    results = answer_both(model, tok, aligner, held, args)
    report(results, follows_form, rule, aligner)
    print(f"\ntotal time {time.time() - t0:.0f} s (training {t_train:.0f} s); adapter: {args.out}")


def answer_both(model, tok, aligner, held: list, args) -> list:
    """(instruction, base answer, aligned answer) for each instruction, greedy: every batch holds
    base rows and aligned rows together (generate.py's batches, one Aligner per row), both asked in
    the template the Aligner was trained with."""
    chat = Chat(template_of(model_dir(None)), tok) if args.template == "chat" else None
    greedy = Sampling(max_new_tokens=args.max_new_tokens, temperature=0.0, top_k=0, seed=args.seed)
    both = AlignerBatch([aligner], model.args)
    jobs = [(q, row) for q in held for row in (0, 1)]  # row 0: the base model, 1: with the Aligner
    texts = {}
    for i in tqdm(range(0, len(jobs), 16), desc="held-out answers (base, aligned)", dynamic_ncols=True):
        chunk = jobs[i: i + 16]
        both.use([row for _, row in chunk])
        prompts = [prompt_ids(tok, Prompt(q), args.template, chat) for q, _ in chunk]
        answers = generate_batch(model, prompts, both, greedy, chat.stop_id if chat else tok.eos_id,
                                 pad_id=tok.pad_id)
        texts.update((job, tok.decode(ids).strip()) for job, ids in zip(chunk, answers))
    return [(q, texts[q, 0], texts[q, 1]) for q in held]


def report(results, follows_form, rule, aligner):
    base = sum(follows_form(b) for _, b, _ in results)
    aligned = sum(follows_form(a) for _, _, a in results)
    n = len(results)
    print(f"\nform check: the answer {rule}")
    print(f"held-out instructions: {n}")
    print(f"  base model        {base:3d}/{n} = {100 * base / n:5.1f}% follow the form")
    print(f"  + {aligner.n_tokens}-token Aligner {aligned:3d}/{n} = {100 * aligned / n:5.1f}% follow the form"
          f"   ({aligner.n_params():,} trained parameters)")
    for q, b, a in results[:: max(1, n // 3)][:3]:  # three answers from across the set
        print(f"\n{q}\n" + side_by_side("BASE: " + b.replace("\n", " / "),
                                         "ALIGNED: " + a.replace("\n", " / ")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=positive_float, default=300, help="training time budget")
    p.add_argument("--tokens", type=positive_int, default=1, help="Aligner tokens")
    p.add_argument("--steps", type=positive_int, default=400,
                   help="optimizer steps at most (the time budget may stop it first)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="answer length limit")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N held-out instructions")
    p.add_argument("--out", type=path_text, default="runs/demo/aligner.pt", help="where the adapter goes")
    p.add_argument("--seed", type=random_seed, default=1337, help="random seed")
    p.add_argument("--template", choices=["alpaca", "chat"], default="alpaca",
                   help="prompts in the paper's Alpaca template, or the model's own chat template")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="the frozen base in 8 or 4 bits (needs torchao)")
    run_main(demo, p.parse_args(argv))


if __name__ == "__main__":
    main()
