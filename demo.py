"""The paper's "form" claim, made visible on a laptop CPU in about six minutes.

    make demo            # or: python demo.py [--steps 100] [--seed 1337] [--tokens 1] [--template chat]

1. converts the embedded default model (SmolLM2-135M-Instruct) on first use;
2. trains a one-token Aligner (828 numbers) on data/form_train.json, where every answer is a
   little letter: "Dear reader," / one sentence / "Yours, Aligner.", for a fixed number of
   optimizer steps from a fixed seed: every machine trains the same Aligner (up to the rounding of
   its kernels), a slow or busy one only takes longer (the progress bar shows the time left);
3. answers the held-out instructions of data/form_heldout.json (other topics, other wording)
   with the base model and with the Aligner, greedy, and prints how many follow the form, and
   three answers side by side.

The frozen base runs in bfloat16 where the processor has bfloat16 units (a CUDA GPU that supports
it, an x86 CPU with AVX512-BF16 or AMX, an Arm CPU with BF16), else in float32 (--dtype chooses);
the Aligner itself trains in float32 and is the same kind of file either way.

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
from support.flags import (QUANTIZE, Runtime, bfloat16_units, decode_dtype, path_text, positive_float,
                           positive_int, random_seed)
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
    units = bfloat16_units("cpu")
    dtype = args.dtype if args.dtype != "auto" else decode_dtype("cpu")  # the rule of generate.py, serve.py
    print(f"the frozen base in {dtype} on the CPU ({'with' if units else 'no'} bfloat16 units)")
    run = train(TrainConfig(data=str(DATA / "form_train.json"), model=str(path), out=args.out,
                            tokens=args.tokens, batch_size=8, micro_batch_size=8, lr=args.lr,
                            warmup_steps=10, schedule="cosine", max_steps=args.steps,
                            eval_every=args.steps, eval_batches=2, val_fraction=0.05, save_every=0,
                            seed=args.seed, template=args.template),
                Runtime(device="cpu", dtype=dtype, quantize=args.quantize))
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
    rows = args.answer_batch  # decoding reads every weight once a step whatever the rows: many rows pay
    for i in tqdm(range(0, len(jobs), rows), desc="held-out answers (base, aligned)", dynamic_ncols=True):
        chunk = jobs[i: i + rows]
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
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps of 8 examples")
    p.add_argument("--lr", type=positive_float, default=3e-2, help="peak learning rate (cosine decay)")
    p.add_argument("--tokens", type=positive_int, default=1, help="Aligner tokens")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="answer length limit")
    p.add_argument("--answer-batch", type=positive_int, default=64, help="rows decoded together")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N held-out instructions")
    p.add_argument("--out", type=path_text, default="runs/demo/aligner.pt", help="where the adapter goes")
    p.add_argument("--seed", type=random_seed, default=1337, help="random seed")
    p.add_argument("--template", choices=["alpaca", "chat"], default="alpaca",
                   help="prompts in the paper's Alpaca template, or the model's own chat template")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the frozen base's dtype; auto: bfloat16 where the CPU has bfloat16 units")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="the frozen base in 8 or 4 bits (needs torchao)")
    run_main(demo, p.parse_args(argv))


if __name__ == "__main__":
    main()
