"""The paper's claims, measured on SmolLM2-135M: form versus knowledge, with the same tuning for every
method, learning curves, fit against transfer, parameter-matched LoRA, and every answer kept.

    python experiments/form_vs_knowledge.py --out experiments/results --dtype bfloat16 --workers 2
    python experiments/form_vs_knowledge.py --quick    # a smoke run (CI), about 70 seconds
    python experiments/form_vs_knowledge.py --out experiments/results --dtype bfloat16 --report-only

The design (methods, learning-rate grids, seeds, budgets, selection rules) is experiments/design.json,
committed before its cells ran. The first command ran the first pass's grid (94 cells, 1 h 54 min on
2 CPU cores) and the second pass; run in this checkout it finds all 142 cells and runs none.
--report-only runs none either: it rewrites the tables and figures from OUT/cells.jsonl (and the
kernel check from OUT/repeats.jsonl), and the report lists every cell the design lacks or does not
call for. Each cell records the attention kernel that computed it (--attention; the first pass's ran
sdpa): experiments/repeat_cell.py trains a cell again under either (see key()).

Every cell (task, method, learning rate, start layer, seed) trains on the same frozen base, is
scored at its checkpoints, and is appended to OUT/cells.jsonl (its decoded answers to
OUT/answers.jsonl), so a killed run started again with the same flags redoes only the cells it
lacks. Two phases:
  1. the grid: every method at every learning rate of its family's grid (design.json's lr_grid),
     seed 1, at the main budget (40 steps on form, 50 on knowledge); the best learning rate of a
     method on a task is the one with the lowest validation loss there;
  2. at each method's best learning rate: seeds 2..S (the main table), the knowledge learning curves
     (seeds 1..S, checkpoints doubling from 50 up to --curve-steps, at the learning rate of each rule:
     validation loss, and validation accuracy where it picks another), and the start-layer sweep of
     the one-token Aligner on form.
Tasks:
  form       data/form_train.json, every answer a letter ("Dear reader," ... "Yours, Aligner.");
             one tenth held out for the validation loss; score: share of the 64 held-out
             instructions (data/form_heldout.json) answered as a letter with a body, split into
             those that reuse a training template with new values and those that do not.
  knowledge  invented people and the real city each lives in (made below: the base model cannot know
             them), four training questions per person (raw prompts: no Alpaca template); validation:
             a fifth wording; score: a sixth and seventh wording, never trained on; recall: the
             training questions themselves. A hit names the right city and no other city.
Methods: Aligner N = 1, 10, 100; the per-layer LLaMA-Adapter variant (10 tokens per layer); LoRA r=8 on
every projection, and LoRA on wq and wv only at r=1 (about N=100's size) and r=3 (about the per-layer
adapter's). The tables and figures go to OUT (claims_report.py).
Read next: experiments/claims_report.py, then docs/claims.md.
"""
import contextlib
import io
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

from aligner import merged_bias  # noqa: E402
from data import batch_indices, collate, format_prompt, load_examples, split  # noqa: E402
from generate import Sampling, generate_batch  # noqa: E402
from make_form_data import follows_form, reuses_template  # noqa: E402
from support.checkpoint import load_model  # noqa: E402
from support.convert import model_dir  # noqa: E402
from support.errors import UserError, run_main  # noqa: E402
from support.flags import (DTYPES, Runtime, check_flags, flag, parse_flags, path_text,  # noqa: E402
                           positive_int)
from support.outputs import check_output_dir, check_output_file  # noqa: E402
from support.temporary import added_folder, write_jsonl  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402
from train import TrainConfig, setup, sft_loss, train_step  # noqa: E402

import claims_report  # noqa: E402  (experiments/ is on the path when this file runs)

OUTPUTS = ["cells.jsonl", "answers.jsonl", "results.md", "results.json", "grid.png", "curves.png",
           "start_layer.png", "gates.png"]


class Method(NamedTuple):
    kind: str  # aligner, per-layer, lora (every projection), lora-qv (wq and wv only), base
    n: int  # tokens (per layer for per-layer), or the LoRA rank


# The design, fixed before the cells ran and committed on its own: methods, grids, seeds, budgets.
DESIGN = json.loads((Path(__file__).with_name("design.json")).read_text())
METHODS = [Method(kind, n) for kind, n in DESIGN["methods"]]
LR_GRID = {family: tuple(values) for family, values in DESIGN["lr_grid"].items()}
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Helsinki", "Havana", "Bangkok",
          "Nairobi", "Athens", "Warsaw", "Madrid", "Tokyo", "Berlin", "Ottawa", "Prague", "Santiago",
          "Manila", "Dakar", "Quito", "Seoul", "Tunis", "Riga"]
ASK = [("Where does {p} live?", "{p} lives in {c}."),
       ("What is the home town of {p}?", "The home town of {p} is {c}."),
       ("In which city does {p} live?", "{p} lives in the city of {c}."),
       ("Where is {p} from?", "{p} is from {c}.")]
ASK_VAL = ("Name the city where {p} lives.", "{p} lives in {c}.")
ASK_HELD_OUT = ["Which city is home to {p}?", "Tell me the name of the place where {p} lives."]
CITY_PATTERN = re.compile(r"\b(" + "|".join(CITIES) + r")\b", re.IGNORECASE)


@dataclass
class ExperimentConfig:
    """The grid's budgets; `--help` lists them as flags."""
    out: str = flag("runs/claims", "folder for cells.jsonl, answers.jsonl, results.md, results.json and "
                    "the figures", path_text)
    quick: bool = flag(False, "a smoke run: one seed, one learning rate, 2 steps of 1 example, 2 prompts")
    seeds: int = flag(DESIGN["seeds"], "seeds for the main table, the curves and the start-layer sweep",
                      positive_int)
    form_steps: int = flag(DESIGN["budgets"]["form_steps"], "optimizer steps per form cell (the main budget)",
                           positive_int)
    knowledge_steps: int = flag(DESIGN["budgets"]["knowledge_steps"], "optimizer steps per knowledge cell "
                                "(the main budget)", positive_int)
    curve_steps: int = flag(DESIGN["budgets"]["curve_steps"], "the knowledge curve's last checkpoint (they "
                            "double from --knowledge-steps)", positive_int)
    batch: int = flag(DESIGN["budgets"]["batch"], "examples per step", positive_int)
    people: int = flag(DESIGN["budgets"]["people"], f"invented people in the knowledge task (at most "
                       f"{len(CITIES)})", positive_int)
    dtype: str = flag("float32", "the frozen base's dtype (bfloat16: faster on CPUs with bf16 units)",
                      choices=["float32", "bfloat16"])
    attention: str = flag("einsum", "the base's attention kernel for the cells run now, recorded in each "
                          "(the first pass ran sdpa: see key())", choices=["einsum", "sdpa"])
    workers: int = flag(1, "cells trained at once, each in its own process with a share of the cores",
                        positive_int)
    report_only: bool = flag(False, "run no cell: rewrite the tables and figures from OUT/cells.jsonl (and "
                             "the base's attention norms kept in OUT/results.json), design cells missing")

    def __post_init__(self):
        check_flags(self)
        if self.people > len(CITIES):
            raise UserError(f"--people is at most {len(CITIES)} (one city each), got {self.people}")
        if self.quick:
            self.seeds, self.form_steps, self.knowledge_steps, self.curve_steps, self.batch = 1, 2, 2, 4, 1
        if self.curve_steps < self.knowledge_steps:
            raise UserError(f"--curve-steps {self.curve_steps} is below --knowledge-steps "
                            f"{self.knowledge_steps}")


# ---- the tasks ------------------------------------------------------------------------------------
class Probe(NamedTuple):
    prompt: str  # the question or instruction
    answer: str  # the right city ("" on form)
    group: str  # the split the score is also reported by ("" for none)


class Task(NamedTuple):
    name: str
    template: str  # train.py's --template: how a record becomes a prompt
    records: list  # training records
    val: list  # validation records (the validation loss)
    probes: dict  # {"score": held-out Probes, and on knowledge "recall" and "val_score"}
    check: Callable  # (answer text, Probe.answer) -> hit
    max_new_tokens: int
    folder: Path  # where train_file and val_file are

    @property
    def train_file(self) -> Path:
        return self.folder / f"{self.name}_train.json"

    @property
    def val_file(self) -> Path:
        return self.folder / f"{self.name}_val.json"


def letter_check(text: str, _answer: str) -> bool:
    return follows_form(text)


def city_check(text: str, city: str) -> bool:
    """A hit names `city` and no other city of the list (as whole words, any case)."""
    return {m.lower() for m in CITY_PATTERN.findall(text)} == {city.lower()}


def form_task(quick: bool, folder: Path) -> Task:
    records = json.loads((ROOT / "data" / "form_train.json").read_text())
    heldout = json.loads((ROOT / "data" / "form_heldout.json").read_text())
    held = [Probe(r["instruction"], "", "reuse" if reuses_template(r["instruction"]) else "new")
            for r in heldout]
    val = records[::10]  # every tenth record: the validation loss
    train_records = [r for i, r in enumerate(records) if i % 10]
    cut = 2 if quick else None
    return Task("form", "alpaca", train_records, val[:cut], {"score": held[:cut]}, letter_check,
                2 if quick else 40, folder)


def qa(question: str, person: str) -> str:
    """The knowledge task's raw prompt: a question and an answer cue (no Alpaca template)."""
    return f"Q: {question.format(p=person)}\nA:"


def knowledge_task(n_people: int, quick: bool, folder: Path) -> Task:
    """Invented names (two made-up words each), each paired with a real city."""
    rng = random.Random(9)
    syllables = ["ka", "lo", "mir", "ven", "tha", "dru", "sel", "quo", "ra", "bex", "ul", "tor", "fen", "ish"]
    people = {}
    while len(people) < n_people:
        name = " ".join("".join(rng.choice(syllables) for _ in range(2)).capitalize() for _ in range(2))
        people[name] = CITIES[len(people)]
    records = [{"instruction": qa(q, p), "output": " " + a.format(p=p, c=c)}
               for p, c in people.items() for q, a in ASK]
    val = [{"instruction": qa(ASK_VAL[0], p), "output": " " + ASK_VAL[1].format(p=p, c=c)}
           for p, c in people.items()]
    probes = {"score": [Probe(qa(q, p), c, "") for p, c in people.items() for q in ASK_HELD_OUT],
              "recall": [Probe(qa(q, p), c, "") for p, c in people.items() for q, _ in ASK],
              "val_score": [Probe(r["instruction"], c, "") for r, c in zip(val, people.values())]}
    cut = 2 if quick else None
    return Task("knowledge", "raw", records, val[:cut], {k: v[:cut] for k, v in probes.items()}, city_check,
                2 if quick else 16, folder)


def make_tasks(cfg: ExperimentConfig, folder: Path) -> dict:
    return {"form": form_task(cfg.quick, folder), "knowledge": knowledge_task(cfg.people, cfg.quick, folder)}


def write_tasks(tasks: dict):
    """The records as files, once per run: train.py and load_examples read files."""
    for task in tasks.values():
        task.train_file.write_text(json.dumps(task.records) + "\n")
        task.val_file.write_text(json.dumps(task.val) + "\n")


def chance(task: Task) -> dict:
    """What a model that always names the same (best) city scores on each probe set."""
    return {name: max(sum(p.answer == a for p in probes) for a in {p.answer for p in probes}) / len(probes)
            for name, probes in task.probes.items()} if task.name == "knowledge" else {}


# ---- the baseline written here: LoRA -------------------------------------------------------------
class LoRA(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen, A (r, in) random and B (out, r) zero at start;
    alpha = 2r (scale 2) at every rank. A and B stay float32 under a bfloat16 base."""

    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        self.base, self.scale = base, 2.0
        self.a = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))  # (r, in)
        self.b = nn.Parameter(torch.zeros(base.out_features, r))  # (out, r)

    def forward(self, x):
        low = x @ self.a.to(x.dtype).T @ self.b.to(x.dtype).T  # (..., out)
        return self.base(x) + low * self.scale  # (..., out)


LORA_TARGETS = {"lora": [("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
                         ("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3")],
                "lora-qv": [("attention", "wq"), ("attention", "wv")]}


def add_lora(model, kind: str, r: int) -> list:
    """Wrap the method's projections of every layer in LoRA; returns the LoRA parameters."""
    params = []
    for layer in model.layers:
        for part, name in LORA_TARGETS[kind]:
            wrapped = LoRA(getattr(getattr(layer, part), name), r)
            setattr(getattr(layer, part), name, wrapped)
            params += [wrapped.a, wrapped.b]
    return params


def remove_lora(model):
    for layer in model.layers:
        for part, name in LORA_TARGETS["lora"]:
            m = getattr(getattr(layer, part), name)
            setattr(getattr(layer, part), name, m.base if isinstance(m, LoRA) else m)


# ---- one cell ------------------------------------------------------------------------------------
class Bench(NamedTuple):
    """What every cell of a process shares: the frozen base, its tokenizer and directory, the tasks."""
    model: nn.Module
    tok: Tokenizer
    path: Path
    tasks: dict


class Trainer(NamedTuple):
    step: Callable  # one optimizer step
    aligner: object  # the Aligner being trained (None for LoRA and the base model)
    params: list  # the trainable tensors


def lora_trainer(bench: Bench, task: Task, cell: dict) -> Trainer:
    """LoRA's own few lines of training with train.py's loss, data split and batches (constant lr, no
    warmup, AdamW as train.py sets it for the Aligners)."""
    params = add_lora(bench.model, cell["method"], cell["n"])
    examples = split(load_examples(task.train_file, bench.tok, 256, task.template).examples, 0.0,
                     cell["seed"])[1]
    optimizer = torch.optim.AdamW(params, lr=cell["lr"], weight_decay=0.02, betas=(0.9, 0.95))
    state = {"step": 0}

    def step():
        idx = batch_indices(len(examples), cell["batch"], state["step"], cell["seed"])
        batch = collate([examples[i] for i in idx], bench.tok.pad_id, "cpu")
        sft_loss(bench.model, None, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
    return Trainer(step, None, params)


def aligner_trainer(bench: Bench, task: Task, cell: dict) -> Trainer:
    """An Aligner (or the per-layer adapter) set up and stepped by train.py itself."""
    cfg = TrainConfig(data=str(task.train_file), model=str(bench.path), out=None, tokens=cell["n"],
                      start_layer=cell["start"], per_layer=cell["method"] == "per-layer",
                      max_steps=max(cell["checkpoints"]), batch_size=cell["batch"],
                      micro_batch_size=cell["batch"], lr=cell["lr"], warmup_steps=0, max_seq_len=256,
                      template=task.template, val_fraction=0.0, eval_every=0, save_every=0,
                      seed=cell["seed"], quiet=True)
    with contextlib.redirect_stdout(io.StringIO()):  # train.py's set-up lines: the bar says enough
        run = setup(cfg, Runtime(device="cpu", attention=cell["attention"]), bench.model)
    return Trainer(lambda: train_step(run, cfg), run.aligner, list(run.aligner.parameters()))


def run_cell(cell: dict, bench: Bench) -> tuple:
    """Train the cell's method (none for the base model), score it at each checkpoint; returns the row
    of cells.jsonl and the line of answers.jsonl."""
    t0, task = time.time(), bench.tasks[cell["task"]]
    torch.manual_seed(cell["seed"])
    bench.model.use_sdpa(cell["attention"] == "sdpa")  # the shared base: for LoRA cells and scoring too
    make = {"base": lambda *_: Trainer(None, None, []), "lora": lora_trainer, "lora-qv": lora_trainer}
    trainer = make.get(cell["method"], aligner_trainer)(bench, task, cell)
    at, answers, step = [], {}, 0
    try:
        for checkpoint in cell["checkpoints"]:
            for _ in range(checkpoint - step):
                trainer.step()
            step = checkpoint
            scores, answers[checkpoint] = evaluate(bench, task, trainer.aligner)
            at.append(dict(step=checkpoint, **scores))
        row = dict(cell, at=at, params=sum(p.numel() for p in trainer.params))
        if cell["method"] == "aligner" and cell["n"] == 1 and cell["task"] == "form":
            row.update(gates=trainer.aligner.gates.detach().tolist(),
                       bias_norms=bias_norms(bench.model, trainer.aligner))
    finally:
        remove_lora(bench.model)
    return dict(row, seconds=round(time.time() - t0, 1)), {"key": key(cell), "answers": answers}


@torch.no_grad()
def evaluate(bench: Bench, task: Task, aligner) -> tuple:
    """({score, its groups, recall, val_score, val_loss}, {probe set: [[prompt, answer, hit], ...]})."""
    scores, answers = {"val_loss": validation_loss(bench, task, aligner)}, {}
    for name, probes in task.probes.items():
        texts = answer(bench, task, aligner, [p.prompt for p in probes])
        hits = [task.check(text, p.answer) for p, text in zip(probes, texts)]
        scores[name] = sum(hits) / len(hits)
        for group in sorted({p.group for p in probes} - {""}):
            mine = [h for p, h in zip(probes, hits) if p.group == group]
            scores[f"{name}_{group}"] = sum(mine) / len(mine)
        answers[name] = [[p.prompt, text, hit] for p, text, hit in zip(probes, texts, hits)]
    return scores, answers


def answer(bench: Bench, task: Task, aligner, prompts: list) -> list:
    """The greedy answers to `prompts` in the task's template, 32 decoded together."""
    greedy = Sampling(max_new_tokens=task.max_new_tokens, temperature=0.0, top_k=0)
    texts = []
    for i in range(0, len(prompts), 32):
        ids = [bench.tok.encode(format_prompt(q, template=task.template)) for q in prompts[i:i + 32]]
        new = generate_batch(bench.model, ids, aligner, greedy, bench.tok.eos_id, pad_id=bench.tok.pad_id)
        texts += [bench.tok.decode(a) for a in new]
    return texts


def validation_loss(bench: Bench, task: Task, aligner) -> float:
    """Mean loss on the task's validation records."""
    examples = load_examples(task.val_file, bench.tok, 256, task.template).examples
    losses = [sft_loss(bench.model, aligner, collate(examples[i:i + 8], bench.tok.pad_id, "cpu"))[0].item()
              for i in range(0, len(examples), 8)]
    return sum(losses) / len(losses)


def bias_norms(model, aligner) -> list:
    """|b_l| of the bias a one-token Aligner merges into each gated layer (aligner.merged_bias)."""
    return [merged_bias(aligner, layer, model.layers[layer].attention.wv.weight,
                        model.layers[layer].attention.wo.weight, model.args).norm().item()
            for layer in range(aligner.start_layer, model.args.n_layers)]


@torch.no_grad()
def attention_norms(bench: Bench) -> list:
    """The base model's mean |attention output| (after wo) per layer over the held-out form prompts:
    the scale a merged bias b_l is added to."""
    model, sums, count = bench.model, [0.0] * bench.model.args.n_layers, 0
    hooks = [layer.attention.wo.register_forward_hook(
        lambda module, inputs, y, i=i: sums.__setitem__(i, sums[i] + y.float().norm(dim=-1).sum().item()))
        for i, layer in enumerate(model.layers)]
    try:
        for p in bench.tasks["form"].probes["score"]:
            ids = torch.tensor([bench.tok.encode(format_prompt(p.prompt))])  # (1, T)
            model(ids)
            count += ids.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return [x / count for x in sums]


# ---- the plan: the grid, then what the best learning rates call for -----------------------------------
def budget(cfg: ExperimentConfig, task: str) -> int:
    return cfg.form_steps if task == "form" else cfg.knowledge_steps


def lr_grid(cfg: ExperimentConfig, kind: str) -> tuple:
    grid = LR_GRID["lora" if kind.startswith("lora") else "prefix"]
    return grid[len(grid) // 2:len(grid) // 2 + 1] if cfg.quick else grid  # --quick: the middle one


def make_cell(cfg: ExperimentConfig, task: str, method: Method, lr: float, seed: int, checkpoints: list,
              start=2) -> dict:
    """A cell as a dict that also names the budget and the data (a cell made with others is not taken
    as done)."""
    cell = dict(task=task, method=method.kind, n=method.n, start=start, seed=seed, lr=lr, batch=cfg.batch,
                checkpoints=checkpoints, dtype=cfg.dtype, quick=cfg.quick, attention=cfg.attention)
    return dict(cell, people=cfg.people) if task == "knowledge" else cell


def grid_cells(cfg: ExperimentConfig) -> list:
    """Phase 1: the base model, and every method at every learning rate of its grid (seed 1)."""
    todo = [make_cell(cfg, task, Method("base", 0), 0.0, 0, [0]) for task in ("form", "knowledge")]
    return todo + [make_cell(cfg, task, m, lr, 1, [budget(cfg, task)])
                   for task in ("form", "knowledge") for m in METHODS for lr in lr_grid(cfg, m.kind)]


def best_lr(cfg: ExperimentConfig, done: dict, task: str, method: Method, by="loss") -> float:
    """The grid's learning rate with the lowest validation loss at the main budget (seed 1), or by
    "accuracy" the highest validation accuracy (ties: the lower loss); among the grid cells done."""
    cells = [done.get(key(make_cell(cfg, task, method, lr, 1, [budget(cfg, task)])))
             for lr in lr_grid(cfg, method.kind)]
    points = {row["lr"]: row["at"][-1] for row in cells if row}
    if not points:
        return None
    if by == "loss":
        return min(points, key=lambda lr: points[lr]["val_loss"])
    return min(points, key=lambda lr: (-points[lr].get("val_score", 0.0), points[lr]["val_loss"]))


def chosen_rates(cfg: ExperimentConfig, done: dict) -> tuple:
    """({(task, method): lr by validation loss}, {method: that lr on knowledge}, {method: the lr by
    validation accuracy on knowledge, where it is another}), for the methods with a grid cell done."""
    chosen = {(task, m): best_lr(cfg, done, task, m) for task in ("form", "knowledge") for m in METHODS}
    chosen = {pair: lr for pair, lr in chosen.items() if lr is not None}
    by_loss = {m: lr for (task, m), lr in chosen.items() if task == "knowledge"}
    by_accuracy = {m: best_lr(cfg, done, "knowledge", m, by="accuracy") for m in by_loss}
    return chosen, by_loss, {m: lr for m, lr in by_accuracy.items() if lr != by_loss[m]}


def followup_cells(cfg: ExperimentConfig, done: dict, n_layers: int) -> list:
    """Phase 2, at each method's chosen learning rates, in the order the design cuts from the end: the
    knowledge curves at the loss rule (every method at seed 1, then 2, then 3), the main table's other
    seeds, the start-layer sweep of the one-token form Aligner, then the curves at the accuracy rule
    where it picks another rate (seed 1 before seeds 2 and 3)."""
    curve = [cfg.knowledge_steps * 2 ** i for i in range(10)
             if cfg.knowledge_steps * 2 ** i <= cfg.curve_steps]  # 50, 100, 200, 400
    seeds = list(range(1, cfg.seeds + 1))
    chosen, by_loss, by_accuracy = chosen_rates(cfg, done)

    def curves(lrs: dict, which: list) -> list:
        return [make_cell(cfg, "knowledge", m, lr, seed, curve) for seed in which for m, lr in lrs.items()
                ] if len(curve) > 1 else []

    todo = curves(by_loss, seeds) + [make_cell(cfg, task, m, lr, seed, [budget(cfg, task)])
                                     for (task, m), lr in chosen.items() for seed in seeds[1:]]
    one, starts = Method("aligner", 1), [0, n_layers - 1] if cfg.quick else [0, 4, 8, 16, n_layers - 1]
    if ("form", one) in chosen:
        todo += [make_cell(cfg, "form", one, chosen["form", one], seed, [cfg.form_steps], start)
                 for start in starts for seed in seeds]
    return todo + curves(by_accuracy, seeds[:1]) + curves(by_accuracy, seeds[1:])


def design_cells(cfg: ExperimentConfig, done: dict, n_layers: int) -> list:
    """Every cell of the design, phase 2 at the learning rates the grid cells done so far choose."""
    return grid_cells(cfg) + followup_cells(cfg, done, n_layers)


def design_check(cfg: ExperimentConfig, done: dict, n_layers: int) -> list:
    """results.md's lines on the cells against experiments/design.json: missing, outside, and every
    chosen learning rate on an edge of its grid or chosen from a grid with cells missing."""
    wanted = {key(c): c for c in design_cells(cfg, done, n_layers)}
    missing, outside = [k for k in wanted if k not in done], [k for k in done if k not in wanted]
    grid = {key(c) for c in grid_cells(cfg)}
    lines = [f"## The cells against the design (experiments/design.json, fixed {DESIGN['fixed']})", "",
             f"{len(wanted) - len(missing)} of the design's {len(wanted)} cells so far are done; "
             f"{len(missing)} "
             f"missing ({len(grid & set(missing))} of them grid cells: phase 2 follows from the grid, so "
             f"more cells may follow); {len(outside)} cells done are outside the design"
             + (" (not in the tables): " + "; ".join(outside[:5]) if outside else "") + ".", "",
             kernel_line([done[k] for k in wanted if k in done]), ""]
    notes = [(f"{task}, {m.kind} {m.n}", choice_notes(cfg, done, task, m))
             for task in ("form", "knowledge") for m in METHODS]
    return lines + [f"- {who}: " + "; ".join(said) for who, said in notes if said] + [""]


def kernel_line(rows: list) -> str:
    """How many of the cells done each attention kernel computed (recorded in each cell)."""
    kernels = sorted({r.get("attention", "not recorded") for r in rows})
    counts = ", ".join(f"{k} {sum(r.get('attention', 'not recorded') == k for r in rows)}" for k in kernels)
    return (f"The base's attention kernel of the cells done: {counts or 'none yet'}. Both compute the same "
            f"function (tests/test_model.py); a cell trained again under the other kernel is another draw "
            f"(key(); experiments/repeat_cell.py).")


def choice_notes(cfg: ExperimentConfig, done: dict, task: str, m: Method) -> list:
    """What to say of a method's chosen learning rate: on an edge of its grid, or from a partial grid."""
    grid, lr = lr_grid(cfg, m.kind), best_lr(cfg, done, task, m)
    if lr is None:
        return ["no grid cell done"]
    have = sum(key(make_cell(cfg, task, m, x, 1, [budget(cfg, task)])) in done for x in grid)
    notes = [f"on the edge of its grid ({lr:g})"] if lr in (grid[0], grid[-1]) and len(grid) > 1 else []
    partial = [f"chosen from {have} of the grid's {len(grid)} learning rates"] if have < len(grid) else []
    return notes + partial


def plan(cfg: ExperimentConfig, done: dict, n_layers: int) -> list:
    """Every cell this run calls for so far: phase 2 is known once phase 1 is done."""
    first = grid_cells(cfg)
    if all(key(c) in done for c in first):
        return first + followup_cells(cfg, done, n_layers)
    return first


# ---- the run: resumable, in one process or several ----------------------------------------------------
def key(cell: dict) -> str:
    """What a cell is, not how it was computed: its attention kernel (einsum or sdpa, the same function
    to rounding, tests/test_model.py) is recorded in the row but is no part of the key. Training at
    these learning rates amplifies rounding: a cell run under the other kernel, or with other threads,
    is another draw (experiments/repeat_cell.py measures it)."""
    names = ("task", "method", "n", "start", "seed", "lr", "batch", "checkpoints", "dtype", "quick", "people")
    return json.dumps({k: cell.get(k) for k in names}, sort_keys=True)


def read_cells(path: Path) -> dict:
    """The finished cells in cells.jsonl by key; a line cut short by a kill is dropped (and the file
    rewritten without it, so that new lines append cleanly)."""
    if not path.exists():
        return {}
    rows, lines = {}, path.read_text().splitlines()
    for line in lines:
        try:
            row = json.loads(line)
            rows[key(row)] = row
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
    if len(rows) != len(lines):
        write_jsonl(path, rows.values())
    return rows


def settings_of(cell: dict) -> tuple:
    """What makes cells comparable: the batch, dtype, smoke-run flag, people, and the checkpoints."""
    return (cell["batch"], cell["dtype"], cell["quick"], cell.get("people"), cell["task"],
            tuple(cell["checkpoints"]))


def check_budget(out: Path, cfg: ExperimentConfig, done: dict, n_layers: int):
    """The results folder holds no cell of another budget or task: its tables would be rewritten from
    a mix (a --quick run over the committed results, say). Cells of this budget that the design does
    not call for are kept, and the report lists them."""
    mine = {settings_of(c) for c in design_cells(cfg, done, n_layers)}
    other = [row for row in done.values() if settings_of(row) not in mine]
    if other:
        names = ("task", "checkpoints", "batch", "lr", "dtype", "quick", "people")
        budget_of = {k: other[0][k] for k in names if k in other[0]}
        raise UserError(f"{out / 'cells.jsonl'} holds {len(other)} cells of another budget or task than "
                        f"this run's (e.g. {budget_of}); name another --out to keep the two apart")


WORKER = {}  # in a worker process: its Bench, made once by start_worker


def start_worker(dtype: str, cfg: ExperimentConfig, folder: str, threads: int):
    torch.set_num_threads(threads)
    path = model_dir(None)
    WORKER["bench"] = Bench(load_model(path, "cpu", DTYPES[dtype]), Tokenizer(path), path,
                            make_tasks(cfg, Path(folder)))


def work(cell: dict) -> tuple:
    return run_cell(cell, WORKER["bench"])


def finished(cells: list, cfg: ExperimentConfig, bench: Bench):
    """(row, answers) of each cell as it finishes: here, or in --workers processes."""
    if cfg.workers == 1:
        yield from (run_cell(c, bench) for c in cells)
        return
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    pool = ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"), initializer=start_worker,
                               initargs=(cfg.dtype, cfg, str(bench.tasks["form"].folder), threads))
    try:
        yield from (f.result() for f in as_completed([pool.submit(work, c) for c in cells]))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_cells(todo: list, done: dict, cfg: ExperimentConfig, bench: Bench, out: Path):
    left = [c for c in todo if key(c) not in done]
    print(f"{len(todo)} cells, {len(todo) - len(left)} already in {out / 'cells.jsonl'}, {len(left)} to run")
    with open(out / "answers.jsonl", "a") as answers, open(out / "cells.jsonl", "a") as log:
        for row, said in tqdm(finished(left, cfg, bench), total=len(left), desc="cells", dynamic_ncols=True):
            answers.write(json.dumps(said) + "\n")  # the answers first: a cell's row says it is complete
            answers.flush()
            log.write(json.dumps(row) + "\n")
            log.flush()
            done[key(row)] = row


def experiment(cfg: ExperimentConfig):
    out = Path(cfg.out)
    if out.exists() and not out.is_dir() or str(cfg.out).endswith(".jsonl"):
        raise UserError(f"--out {cfg.out} must be a folder (cells.jsonl, results.md, ... go inside it)")
    check_output_dir(out, add=True)  # never / or the current folder; one this project made, or a new one
    for name in OUTPUTS:  # each file the run writes passes the output gate, before any work
        check_output_file(out / name)
    done = read_cells(out / "cells.jsonl")
    if cfg.report_only:
        attention = kept_attention(out)
        check_budget(out, cfg, done, len(attention))
        return report(cfg, out, done, attention, make_tasks(cfg, out))
    path = model_dir(None)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
    model, tok = load_model(path, "cpu", DTYPES[cfg.dtype]), Tokenizer(path)
    n_layers = model.args.n_layers
    check_budget(out, cfg, done, n_layers)
    with added_folder(out, "experiments/form_vs_knowledge.py", OUTPUTS), \
            tempfile.TemporaryDirectory() as scratch:
        bench = Bench(model, tok, path, make_tasks(cfg, Path(scratch)))
        write_tasks(bench.tasks)
        run_cells(grid_cells(cfg), done, cfg, bench, out)
        run_cells(plan(cfg, done, n_layers), done, cfg, bench, out)
        report(cfg, out, done, attention_norms(bench), bench.tasks)


def kept_attention(out: Path) -> list:
    """--report-only: the base's mean attention-output norm per layer, as the last full run kept it."""
    try:
        kept = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"--report-only needs {out / 'results.json'} from a run: run the cells first") \
            from None
    if "attention" in kept:
        return kept["attention"]
    norms = kept["by_layer"]["attention_norm"]  # results.json of the first pass: layers 2.. only
    return [None] * kept["by_layer"]["layers"][0] + norms  # layers below the Aligner's: not kept


def report(cfg: ExperimentConfig, out: Path, done: dict, attention: list, tasks: dict):
    """results.md, results.json and the figures from the design's cells done (claims_report.py)."""
    n_layers = len(attention)
    rows = [done[key(c)] for c in design_cells(cfg, done, n_layers) if key(c) in done]
    info = {"chance": chance(tasks["knowledge"]),
            "probes": {t.name: {k: len(v) for k, v in t.probes.items()} for t in tasks.values()},
            "groups": {t.name: {f"{k}_{g}": sum(p.group == g for p in v) for k, v in t.probes.items()
                                for g in {p.group for p in v} - {""}} for t in tasks.values()}}
    best = [dict(task=t, method=m.kind, n=m.n, lr=best_lr(cfg, done, t, m))
            for t in ("form", "knowledge") for m in METHODS]  # the one place the choice is made
    settings = {k: v for k, v in asdict(cfg).items() if k != "report_only"}
    repeats = read_cells(out / "repeats.jsonl").values()  # cells trained again (repeat_cell.py --record)
    claims_report.write(rows, out, settings, n_layers, info, attention,
                        {"lr_grid": LR_GRID, "methods": METHODS, "best": best},
                        design_check(cfg, done, n_layers), repeats)


def main(argv=None):
    run_main(lambda: experiment(*parse_flags(argv, __doc__, ExperimentConfig)))


if __name__ == "__main__":
    main()
