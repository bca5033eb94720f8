"""The paper's claims, measured on SmolLM2-135M: form versus knowledge, the start layer, the gates.

    python experiments/form_vs_knowledge.py            # the full grid: 53 cells, 54 minutes on 2 CPU cores
    python experiments/form_vs_knowledge.py --quick    # a smoke run (CI), about 40 seconds

Every cell (task, method, start layer, seed) trains through train.py's loop on the same frozen base
and is scored on held-out prompts; each finished cell is appended to OUT/cells.jsonl, so a killed
run started again with the same flags redoes only the cells it lacks. Tasks:
  form       data/form_train.json, every answer a letter ("Dear reader," ... "Yours, Aligner.");
             one tenth of it is held out for the validation loss; score: share of the held-out
             instructions (data/form_heldout.json, other topics in other words) answered in form.
  knowledge  invented people and the real city each lives in (made below: the base model cannot
             know them), four questions per person to train on; score: share of answers naming the
             right city to two questions per person worded in ways training never used.
Methods: Aligner N = 1, 10, 100; the per-layer LLaMA-Adapter variant (10 tokens per layer); LoRA
r = 8 on every projection (written here, not in the core). Then the start-layer sweep of the
one-token Aligner on the form task. The tables and figures go to OUT (report in claims_report.py).
Read next: experiments/claims_report.py, then README.md, section "What the paper claims, measured".
"""
import contextlib
import io
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

from aligner import merged_bias  # noqa: E402
from data import batch_indices, collate, format_prompt, load_examples, split  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402
from generate import Sampling, generate_batch  # noqa: E402
from make_form_data import follows_form  # noqa: E402
from support.checkpoint import load_model  # noqa: E402
from support.convert import model_dir  # noqa: E402
from support.errors import UserError, run_main  # noqa: E402
from support.outputs import check_output_file  # noqa: E402
from support.flags import (Runtime, check_flags, flag, parse_flags, path_text, positive_float,  # noqa: E402
                           positive_int)
from support.temporary import write_jsonl  # noqa: E402
from train import TrainConfig, sft_loss, train  # noqa: E402

import claims_report  # noqa: E402  (experiments/ is on the path when this file runs)

OUTPUTS = ["cells.jsonl", "results.md", "results.json", "grid.png", "start_layer.png", "gates.png"]
METHODS = [("aligner", 1), ("aligner", 10), ("aligner", 100), ("per-layer", 10), ("lora", 8)]
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Helsinki", "Havana", "Bangkok",
          "Nairobi", "Athens", "Warsaw", "Madrid", "Tokyo", "Berlin", "Ottawa", "Prague", "Santiago",
          "Manila", "Dakar", "Quito", "Seoul", "Tunis", "Riga"]
ASK = [("Where does {p} live?", "{p} lives in {c}."),
       ("What is the home town of {p}?", "The home town of {p} is {c}."),
       ("In which city does {p} live?", "{p} lives in the city of {c}."),
       ("Where is {p} from?", "{p} is from {c}.")]
ASK_HELD_OUT = ["Which city is home to {p}?", "Tell me the name of the place where {p} lives."]


@dataclass
class ExperimentConfig:
    """The grid's budgets; `--help` lists them as flags."""
    out: str = flag("runs/claims", "folder for cells.jsonl, results.md, results.json and the figures",
                    path_text)
    quick: bool = flag(False, "a smoke run: one seed, 2 steps of 2 examples, 2 prompts per task")
    seeds: int = flag(3, "seeds per cell", positive_int)
    form_steps: int = flag(40, "optimizer steps per form cell", positive_int)
    knowledge_steps: int = flag(50, "optimizer steps per knowledge cell", positive_int)
    batch: int = flag(8, "examples per step", positive_int)
    people: int = flag(16, f"invented people in the knowledge task (at most {len(CITIES)})", positive_int)
    lr: float = flag(9e-3, "Aligner and per-layer adapter learning rate", positive_float)
    lora_lr: float = flag(3e-3, "LoRA learning rate", positive_float)

    def __post_init__(self):
        check_flags(self)
        if self.people > len(CITIES):
            raise UserError(f"--people is at most {len(CITIES)} (one city each), got {self.people}")
        if self.quick:
            self.seeds, self.form_steps, self.knowledge_steps, self.batch = 1, 2, 2, 2


# ---- the tasks ------------------------------------------------------------------------------------
class Task:
    """Training records, validation records (or none), held-out (prompt, check) pairs, answer length."""

    def __init__(self, name, records, val, held, max_new_tokens):
        self.name, self.records, self.val, self.held = name, records, val, held
        self.max_new_tokens = max_new_tokens

    def write(self, folder: Path):
        """The records as files in `folder`, once per run: train.py and load_examples read files."""
        self.train_file, self.val_file = folder / f"{self.name}_train.json", folder / f"{self.name}_val.json"
        self.train_file.write_text(json.dumps(self.records) + "\n")
        self.val_file.write_text(json.dumps(self.val) + "\n")


def form_task(quick: bool) -> Task:
    records = json.loads((ROOT / "data" / "form_train.json").read_text())
    heldout = json.loads((ROOT / "data" / "form_heldout.json").read_text())
    held = [(r["instruction"], follows_form) for r in heldout]
    val = records[::10]  # every tenth record: the validation loss of the start-layer sweep
    train_records = [r for i, r in enumerate(records) if i % 10]
    return Task("form", train_records, val, held[:2] if quick else held, 4 if quick else 40)


def knowledge_task(n_people: int, quick: bool) -> Task:
    """Invented names (two made-up words each), each paired with a real city."""
    rng = random.Random(9)
    syllables = ["ka", "lo", "mir", "ven", "tha", "dru", "sel", "quo", "ra", "bex", "ul", "tor", "fen", "ish"]
    people = {}
    while len(people) < n_people:
        name = " ".join("".join(rng.choice(syllables) for _ in range(2)).capitalize() for _ in range(2))
        people[name] = CITIES[len(people)]
    records = [{"instruction": q.format(p=p), "output": a.format(p=p, c=c)}
               for p, c in people.items() for q, a in ASK]

    def names(city):
        return lambda text: city.lower() in text.lower()

    held = [(q.format(p=p), names(c)) for p, c in people.items() for q in ASK_HELD_OUT]
    return Task("knowledge", records, [], held[:2] if quick else held, 4 if quick else 16)


# ---- the baseline written here: LoRA -------------------------------------------------------------
class LoRA(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen, A (r, in) random and B (out, r) zero at start."""

    def __init__(self, base: nn.Linear, r=8, alpha=16):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.a = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))  # (r, in)
        self.b = nn.Parameter(torch.zeros(base.out_features, r))  # (out, r)

    def forward(self, x):
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale  # (..., out)


LORA_TARGETS = [("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
                ("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3")]


def add_lora(model, r: int) -> list:
    """Wrap every projection of every layer in LoRA; returns the LoRA parameters."""
    params = []
    for layer in model.layers:
        for part, name in LORA_TARGETS:
            wrapped = LoRA(getattr(getattr(layer, part), name), r)
            setattr(getattr(layer, part), name, wrapped)
            params += [wrapped.a, wrapped.b]
    return params


def train_lora(model, tok, task: Task, cell: dict) -> list:
    """LoRA's own few lines of training with train.py's loss, data split and batches (constant lr,
    no warmup, as the Aligner cells); returns the LoRA parameters, left in the model."""
    torch.manual_seed(cell["seed"])
    params = add_lora(model, cell["n"])
    examples = split(load_examples(task.train_file, tok, 256).examples, 0.0, cell["seed"])[1]
    optimizer = torch.optim.AdamW(params, lr=cell["lr"], weight_decay=0.02, betas=(0.9, 0.95))
    for step in range(cell["steps"]):
        idx = batch_indices(len(examples), cell["batch"], step, cell["seed"])
        batch = collate([examples[i] for i in idx], tok.pad_id, model.output.weight.device)
        loss, _ = sft_loss(model, None, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return params


def remove_lora(model):
    for layer in model.layers:
        for part, name in LORA_TARGETS:
            m = getattr(getattr(layer, part), name)
            setattr(getattr(layer, part), name, m.base if isinstance(m, LoRA) else m)


# ---- one cell ------------------------------------------------------------------------------------
def cells(cfg: ExperimentConfig, n_layers: int, n_held: dict) -> list:
    """Every cell of the run, as dicts that also name the budget and the task's size (a cell made
    with others is not taken as done). The base model first, then the grid, then the sweep."""
    starts = [0, 2, n_layers - 1] if cfg.quick else [0, 1, 2, 4, 8, 16, n_layers - 6, n_layers - 1]
    seeds = range(1, cfg.seeds + 1)
    todo = [dict(task=task, method="base", n=0, start=2, seed=0) for task in ("form", "knowledge")]
    todo += [dict(task=task, method=kind, n=n, start=2, seed=seed)
             for task in ("form", "knowledge") for kind, n in METHODS for seed in seeds]
    todo += [dict(task="form", method="aligner", n=1, start=s, seed=seed)
             for s in starts if s != 2 for seed in seeds]
    for c in todo:
        steps = cfg.form_steps if c["task"] == "form" else cfg.knowledge_steps
        c.update(steps=0 if c["method"] == "base" else steps, batch=cfg.batch,
                 lr=cfg.lora_lr if c["method"] == "lora" else cfg.lr, held=n_held[c["task"]])
        if c["task"] == "knowledge":
            c["people"] = cfg.people
    return todo


def run_cell(cell: dict, model, tok, path: Path, task: Task) -> dict:
    """Train the cell's method (none for the base model), score it; the row of cells.jsonl."""
    t0 = time.time()
    params = train_lora(model, tok, task, cell) if cell["method"] == "lora" else None
    aligner = None
    try:
        if cell["method"] in ("aligner", "per-layer"):
            with contextlib.redirect_stdout(io.StringIO()):  # train.py's set-up lines: the bar says enough
                aligner = train(TrainConfig(
                    data=str(task.train_file), model=str(path), out=None, tokens=cell["n"],
                    start_layer=cell["start"], per_layer=cell["method"] == "per-layer",
                    max_steps=cell["steps"],
                    batch_size=cell["batch"], micro_batch_size=cell["batch"], lr=cell["lr"], warmup_steps=0,
                    max_seq_len=256, val_fraction=0.0, eval_every=0, save_every=0, seed=cell["seed"],
                    quiet=True), Runtime(device="cpu"), model).aligner
        row = dict(cell, score=score(model, tok, aligner, task),
                   val_loss=validation_loss(model, tok, aligner, task),
                   params=sum(p.numel() for p in params) if params else aligner.n_params() if aligner else 0)
        if aligner is not None and cell["method"] == "aligner" and cell["n"] == 1:
            row.update(gates=aligner.gates.detach().tolist(), bias_norms=bias_norms(model, aligner))
    finally:
        remove_lora(model)
    return dict(row, seconds=round(time.time() - t0, 1))


@torch.no_grad()
def score(model, tok, aligner, task: Task) -> float:
    """Share of held-out prompts whose greedy answer passes the task's check (32 decoded together)."""
    greedy = Sampling(max_new_tokens=task.max_new_tokens, temperature=0.0, top_k=0)
    hits = 0
    for i in range(0, len(task.held), 32):
        chunk = task.held[i:i + 32]
        ids = [tok.encode(format_prompt(q)) for q, _ in chunk]
        answers = generate_batch(model, ids, aligner, greedy, tok.eos_id, pad_id=tok.pad_id)
        hits += sum(check(tok.decode(a)) for (_, check), a in zip(chunk, answers))
    return hits / len(task.held)


@torch.no_grad()
def validation_loss(model, tok, aligner, task: Task):
    """Mean loss on the task's validation records (None when it has none)."""
    if not task.val:
        return None
    examples = load_examples(task.val_file, tok, 256).examples
    device = model.output.weight.device
    losses = [sft_loss(model, aligner, collate(examples[i:i + 8], tok.pad_id, device))[0].item()
              for i in range(0, len(examples), 8)]
    return sum(losses) / len(losses)


def bias_norms(model, aligner) -> list:
    """|b_l| of the bias a one-token Aligner merges into each gated layer (aligner.merged_bias)."""
    return [merged_bias(aligner, layer, model.layers[layer].attention.wv.weight,
                        model.layers[layer].attention.wo.weight, model.args).norm().item()
            for layer in range(aligner.start_layer, model.args.n_layers)]


@torch.no_grad()
def attention_norms(model, tok, task: Task) -> list:
    """The base model's mean |attention output| (after wo) per layer over the task's held-out
    prompts: the scale a merged bias b_l is added to."""
    sums, count = [0.0] * model.args.n_layers, 0
    hooks = [layer.attention.wo.register_forward_hook(
        lambda module, inputs, y, i=i: sums.__setitem__(i, sums[i] + y.norm(dim=-1).sum().item()))
        for i, layer in enumerate(model.layers)]
    try:
        for q, _ in task.held:
            ids = torch.tensor([tok.encode(format_prompt(q))], device=model.output.weight.device)  # (1, T)
            model(ids)
            count += ids.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return [x / count for x in sums]


# ---- the run: resumable ----------------------------------------------------------------------------
def key(cell: dict) -> str:
    names = ("task", "method", "n", "start", "seed", "steps", "batch", "lr", "held", "people")
    return json.dumps({k: cell.get(k) for k in names}, sort_keys=True)


def read_cells(path: Path) -> dict:
    """The finished cells in cells.jsonl by key; a line cut short by a kill is dropped (and the
    file rewritten without it, so that new lines append cleanly)."""
    if not path.exists():
        return {}
    rows, lines = {}, path.read_text().splitlines()
    for line in lines:
        try:
            row = json.loads(line)
            rows[key(row)] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if len(rows) != len(lines):
        write_jsonl(path, rows.values())
    return rows


def check_budget(out: Path, todo: list, done: dict):
    """The results folder holds no cell of another budget or task: its tables would be rewritten
    from a mix (a --quick run over the committed results, say)."""
    mine = {key(c) for c in todo}
    other = [row for k, row in done.items() if k not in mine]
    if other:
        names = ("task", "steps", "batch", "lr", "held", "people")
        budget = {k: other[0][k] for k in names if k in other[0]}
        raise UserError(f"{out / 'cells.jsonl'} holds {len(other)} cells of another budget or task than "
                        f"this run's (e.g. {budget}); name another --out to keep the two apart")


def experiment(cfg: ExperimentConfig):
    out = Path(cfg.out)
    if out.exists() and not out.is_dir() or str(cfg.out).endswith(".jsonl"):
        raise UserError(f"--out {cfg.out} must be a folder (cells.jsonl, results.md, ... go inside it)")
    for name in OUTPUTS:  # each file the run writes passes the output gate, before any work
        check_output_file(out / name)
    path = model_dir(None)
    model, tok = load_model(path), Tokenizer(path)
    tasks = {"form": form_task(cfg.quick), "knowledge": knowledge_task(cfg.people, cfg.quick)}
    n_held = {name: len(t.held) for name, t in tasks.items()}
    todo, done = cells(cfg, model.args.n_layers, n_held), read_cells(out / "cells.jsonl")
    check_budget(out, todo, done)
    out.mkdir(parents=True, exist_ok=True)
    left = [c for c in todo if key(c) not in done]
    print(f"{len(todo)} cells, {len(todo) - len(left)} already in {out / 'cells.jsonl'}, {len(left)} to run")
    with tempfile.TemporaryDirectory() as scratch, open(out / "cells.jsonl", "a") as log:
        for task in tasks.values():
            task.write(Path(scratch))
        for cell in tqdm(left, desc="cells", dynamic_ncols=True):
            row = run_cell(cell, model, tok, path, tasks[cell["task"]])
            log.write(json.dumps(row) + "\n")
            log.flush()
            done[key(row)] = row
    rows = [done[key(c)] for c in todo]
    claims_report.write(rows, out, asdict(cfg), model.args.n_layers, n_held,
                        attention_norms(model, tok, tasks["form"]))


def main(argv=None):
    run_main(lambda: experiment(*parse_flags(argv, __doc__, ExperimentConfig)))


if __name__ == "__main__":
    main()
