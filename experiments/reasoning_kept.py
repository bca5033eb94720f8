"""Does a form Aligner keep the base's reasoning? The base model, the demo's one-token Aligner, an
Aligner N=10 and the experiment's LoRA r=8 (merged into the weights), each trained on the form task
(data/form_train.json: every answer a little letter) for seeds 1..S, scored by lm-eval through
evaluate.py's model class on the local multiple-choice set (aligner_mc: 60 questions, acc) and the
local arithmetic set (aligner_arith: 40 GSM8K-format problems, 3-shot, greedy, exact_match under the
strict and the flexible filter).

    python experiments/reasoning_kept.py --out experiments/reasoning      # the full run
    python experiments/reasoning_kept.py --quick --out runs/reasoning-quick         # a smoke run
    python experiments/reasoning_kept.py --limit 20 --arith-limit 10                # fewer documents

The methods, each as it was trained elsewhere in this project:
  demo-1   demo.py's one-token Aligner: train.py's TrainConfig as demo.py sets it (lr 3e-2, 10 warmup
           steps, cosine, 100 steps of 8), the seed given;
  aligner-10  the experiment's N=10 Aligner on form: its chosen form lr (results.md: 0.03), 40 steps of 8,
           constant lr, start layer 2 (form_vs_knowledge.aligner_trainer);
  lora-8   the experiment's LoRA r=8 on every projection: its chosen form lr (0.001), 40 steps of 8
           (form_vs_knowledge.lora_trainer), then merged exactly, W + 2 * B @ A in float32, into a copy
           of the base written as a converted model directory (OUT/models/, removed after scoring
           unless --keep-models), scored as `evaluate.py --model DIR --base` scores it.
The frozen base trains in bfloat16 where the CPU has bfloat16 units (the rule demo.py follows; the
experiment ran in bfloat16), else float32; every model is scored in --dtype (default float32:
deterministic, greedy + loglikelihood, so the base is scored once). Each (method, seed) is written to
OUT/results.json when done, and a run started again skips those already there. OUT/results.md: Wilson
95% intervals (seeds pooled, hits / (S x n)) and Newcombe's interval of each method minus the base.
Read next: docs/claims.md ("Is reasoning kept?"), then experiments/form_vs_knowledge.py.
"""
import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments"), str(ROOT / "data")]

import form_vs_knowledge as fvk  # noqa: E402
from claims_report import newcombe, wilson  # noqa: E402
from evaluate import EvalConfig, aligner_lm, evaluate_one, lm_eval_module, task_manager  # noqa: E402
from support.checkpoint import load_base, load_model, read_state, write_dir  # noqa: E402
from support.convert import model_dir  # noqa: E402
from support.flags import Runtime, decode_dtype  # noqa: E402
from support.temporary import atomic_write  # noqa: E402
from train import TrainConfig, train  # noqa: E402

METHODS = {"demo-1": "demo's one-token Aligner (lr 3e-2, 100 steps)",
           "aligner-10": "Aligner N=10 (lr 0.03, 40 steps)",
           "lora-8": "LoRA r=8, merged (lr 0.001, 40 steps)"}
LR = {"aligner-10": 0.03, "lora-8": 0.001}  # experiments/results/results.md: each method's form lr
METRICS = [("aligner_mc", "acc,none", "mc acc"),
           ("aligner_arith", "exact_match,strict-match", "arith strict"),
           ("aligner_arith", "exact_match,flexible-extract", "arith flexible")]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "source.json"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reasoning", help="folder for results.json and results.md")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..S of each trained method")
    p.add_argument("--limit", type=int, help="documents per task (default: all)")
    p.add_argument("--arith-limit", type=int, help="aligner_arith documents (default: --limit)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 steps, 4 documents")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="scoring dtype")
    p.add_argument("--model", help="converted base directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--keep-models", action="store_true", help="keep the merged LoRA directories")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a shared machine)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.limit = 1, 4
    args.arith_limit = args.arith_limit or args.limit
    args.steps = {"demo-1": 2 if args.quick else 100, "other": 2 if args.quick else 40}
    return args


def log(t0: float, text: str):
    print(f"[{time.time() - t0:7.0f} s] {text}", flush=True)


# ---- training ------------------------------------------------------------------------------------
def train_demo(model, path: Path, seed: int, steps: int, dtype: str):
    """demo.py's TrainConfig (its lr, warmup, cosine, batch 8) at `seed`, over the shared model."""
    cfg = TrainConfig(data=str(ROOT / "data" / "form_train.json"), model=str(path), out=None, tokens=1,
                      batch_size=8, micro_batch_size=8, lr=3e-2, warmup_steps=10, schedule="cosine",
                      max_steps=steps, eval_every=steps, eval_batches=2, val_fraction=0.05, save_every=0,
                      seed=seed, template="alpaca", quiet=True)
    return train(cfg, Runtime(device="cpu", dtype=dtype), model).aligner


def experiment_cell(method: str, seed: int, steps: int, dtype: str) -> dict:
    """A form cell of form_vs_knowledge.py at the method's chosen learning rate, under the einsum
    attention (every command's default, and this experiment's since it was written)."""
    kind, n = ("aligner", 10) if method == "aligner-10" else ("lora", 8)
    return dict(task="form", method=kind, n=n, start=2, seed=seed, lr=LR[method], batch=8,
                checkpoints=[steps], dtype=dtype, quick=False, attention="einsum")


def train_cell(bench, cell: dict):
    """Train one experiment cell; returns its Trainer (the model keeps a LoRA's wrappers)."""
    torch.manual_seed(cell["seed"])  # as form_vs_knowledge.run_cell: the LoRA's A from this seed
    bench.model.use_sdpa(cell["attention"] == "sdpa")  # as run_cell: the shared base, LoRA cells too
    make = fvk.lora_trainer if cell["method"] == "lora" else fvk.aligner_trainer
    trainer = make(bench, bench.tasks["form"], cell)
    for _ in range(cell["checkpoints"][-1]):
        trainer.step()
    return trainer


@torch.no_grad()
def merge_lora(model, base_path: Path, out: Path) -> Path:
    """The base's weights with each LoRA of `model` merged in float32 (W + scale * B @ A), written as a
    converted model directory `out` (with the base's tokenizer)."""
    args, state = read_state(base_path)
    state = {k: v.float() for k, v in state.items()}  # each (out, in) or (dim,)
    for i, layer in enumerate(model.layers):
        for part, name in fvk.LORA_TARGETS["lora"]:
            m = getattr(getattr(layer, part), name)
            if isinstance(m, fvk.LoRA):
                key = f"layers.{i}.{part}.{name}.weight"
                delta = m.scale * (m.b.float() @ m.a.float())  # (out, in)
                state[key] = state[key] + delta  # (out, in)
    out.mkdir(parents=True, exist_ok=True)
    write_dir(args, state, out)
    for name in TOKENIZER_FILES:
        if (base_path / name).is_file():
            shutil.copy(base_path / name, out / name)
    return out


# ---- scoring -------------------------------------------------------------------------------------
def score(base, aligner, args) -> dict:
    """{task: {metric: {hits, n, accuracy}}} of one model (base + aligner, None: the base alone)
    through evaluate.py's lm-eval model class; each task at its own limit."""
    lm_eval, _ = lm_eval_module()
    max_length = base.model.args.max_seq_len
    if aligner is not None:
        aligner.to(base.model.output.weight.device)
    out = {}
    for task, limit in (("aligner_mc", args.limit), ("aligner_arith", args.arith_limit)):
        cfg = EvalConfig(tasks=task, limit=limit, batch_size=16)  # 16 answers decoded together
        results = evaluate_one(lm_eval, aligner_lm(base, aligner, 16, max_length), cfg, manager(task))
        n = results["n-samples"][task]["effective"]
        for t, metric, label in METRICS:
            if t == task:
                acc = results["results"][task][metric]
                out[label] = {"hits": round(acc * n), "n": n, "accuracy": acc}
    return out


@functools.lru_cache(maxsize=None)
def manager(task: str):
    """evaluate.py's lm-eval TaskManager for `task`, made once: it indexes every task lm-eval knows."""
    return task_manager(EvalConfig(tasks=task))


def runtime(dtype: str) -> Runtime:
    return Runtime(device="cpu", dtype=dtype)


def run_method(method: str, seed: int, ctx: dict) -> dict:
    """Train `method` at `seed` over the training base and score it over the scoring base."""
    args, path, t0 = ctx["args"], ctx["path"], ctx["t0"]
    if method == "base":
        return score(ctx["scorer"], None, args)
    if method == "demo-1":
        aligner = train_demo(ctx["bench"].model, path, seed, args.steps["demo-1"], ctx["train_dtype"])
        log(t0, f"{method} seed {seed}: trained; scoring")
        return score(ctx["scorer"], aligner, args)
    trainer = train_cell(ctx["bench"], experiment_cell(method, seed, args.steps["other"], ctx["train_dtype"]))
    log(t0, f"{method} seed {seed}: trained; scoring")
    if method == "aligner-10":
        return score(ctx["scorer"], trainer.aligner, args)
    folder = Path(args.out) / "models" / f"{method}-seed{seed}"
    try:
        merge_lora(ctx["bench"].model, path, folder)
    finally:
        fvk.remove_lora(ctx["bench"].model)
    merged = load_base(folder, runtime(args.dtype), torch.device("cpu"))
    result = score(merged, None, args)
    if not args.keep_models:
        shutil.rmtree(folder)
    return result


# ---- the report ----------------------------------------------------------------------------------
def pooled(runs: dict, label: str) -> tuple:
    """(hits, documents) of one metric summed over the seeds run."""
    rows = [r[label] for r in runs.values()]
    return sum(r["hits"] for r in rows), sum(r["n"] for r in rows)


def ci(k: int, n: int) -> str:
    low, high = wilson(k, n)
    return f"{k}/{n} = {100 * k / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def diff_text(k1: int, n1: int, k0: int, n0: int) -> str:
    low, high = newcombe(k1, n1, k0, n0)
    called = "lower" if high < 0 else "higher" if low > 0 else "no difference called"
    return f"{100 * (k1 / n1 - k0 / n0):+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]: {called}"


def report(results: dict) -> str:
    """The markdown tables: Wilson intervals per model, Newcombe's on each method minus the base."""
    runs, names = results["runs"], dict(base="base model (float32, scored once)", **METHODS)
    head = "| model | seeds | " + " | ".join(m[2] for m in METRICS) + " |"
    lines = ["Hits / documents, seeds pooled, Wilson 95%:", "", head, "|---|---|---|---|---|"]
    for method in [m for m in names if m in runs]:
        cells = [ci(*pooled(runs[method], label)) for _, _, label in METRICS]
        lines.append(f"| {names[method]} | {len(runs[method])} | " + " | ".join(cells) + " |")
    lines += ["", "Each method minus the base, percentage points, Newcombe 95% (called only where the "
              "interval excludes 0):", "", head.replace("| seeds ", ""), "|---|---|---|---|"]
    if "base" in runs:
        for method in [m for m in METHODS if m in runs]:
            cells = [diff_text(*pooled(runs[method], label), *pooled(runs["base"], label))
                     for _, _, label in METRICS]
            lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save(out: Path, results: dict):
    text = json.dumps(results, indent=1) + "\n"
    atomic_write(out / "results.json", lambda f: f.write(text.encode()))
    md = f"Settings: {json.dumps(results['settings'])}\n\n" + report(results)
    atomic_write(out / "results.md", lambda f: f.write(md.encode()))


# ---- the run -------------------------------------------------------------------------------------
def setup(args) -> dict:
    """The two bases (training, scoring), the experiment's form task files, the results so far."""
    out, path = Path(args.out), model_dir(args.model)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    train_dtype = decode_dtype("cpu")  # demo.py's rule: bfloat16 where the CPU has bfloat16 units
    settings = dict(seeds=args.seeds, limit=args.limit, arith_limit=args.arith_limit, quick=args.quick,
                    score_dtype=args.dtype, train_dtype=train_dtype, steps=args.steps,
                    torch=torch.__version__, model=str(path))
    old = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    if old and {k: v for k, v in old["settings"].items() if k != "seeds"} != \
            {k: v for k, v in settings.items() if k != "seeds"}:
        sys.exit(f"{out}/results.json was made with other settings: {old['settings']}; use another --out")
    results = dict(old or {"runs": {}}, settings=settings)
    tasks = {"form": fvk.form_task(False, out / "tasks")}
    fvk.write_tasks(tasks)
    bench = fvk.Bench(load_model(path, "cpu", getattr(torch, train_dtype)), None, path, tasks)
    scorer = load_base(path, runtime(args.dtype), torch.device("cpu"))
    bench = bench._replace(tok=scorer.tok)
    return dict(args=args, path=path, out=out, results=results, bench=bench, scorer=scorer,
                train_dtype=train_dtype, t0=time.time())


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = setup(args)
    results, t0 = ctx["results"], ctx["t0"]
    todo = [("base", 0)] + [(m, s) for s in range(1, args.seeds + 1) for m in METHODS]  # seed by seed
    for method, seed in todo:
        if str(seed) in results["runs"].get(method, {}):
            log(t0, f"{method} seed {seed}: in results.json already, skipped")
            continue
        log(t0, f"{method} seed {seed}: start")
        started = time.time()
        scores = run_method(method, seed, ctx)
        results["runs"].setdefault(method, {})[str(seed)] = dict(scores, seconds=round(time.time() - started))
        save(ctx["out"], results)
        log(t0, f"{method} seed {seed}: " + ", ".join(f"{k} {v['hits']}/{v['n']}" for k, v in scores.items()))
    print(report(results))
    log(t0, f"done; {ctx['out'] / 'results.json'}, {ctx['out'] / 'results.md'}")


if __name__ == "__main__":
    main()
