"""Train one finished cell of the claims experiment again and print its stored scores beside the new
ones: does the cell repeat, under this attention kernel and this many threads?

    python experiments/repeat_cell.py --out experiments/results --task knowledge --method aligner --n 100 \
        --lr 0.03 --seed 1 --attention sdpa --threads 1   # a first-pass cell: the same numbers, bit for bit
    python experiments/repeat_cell.py --out experiments/results --task knowledge --method aligner --n 10 \
        --lr 0.03 --seed 1 --steps 50,100,200,400        # a seed-1 curve under the einsum kernel

The cell is found in OUT/cells.jsonl by its task, method, size, learning rate, seed and checkpoints
(--steps; default: the main budget) and trained by form_vs_knowledge.run_cell as the experiment trains
it, in the cell's dtype, on as many threads as --threads (the experiment's workers run one each).
Nothing is written but, with --record, the new row appended to that file (with its kernel and thread
count). Exit 0 when every score at every checkpoint is equal, 1 when one differs.
Read next: experiments/form_vs_knowledge.py (key(): why a kernel or a thread count makes another draw).
"""
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import form_vs_knowledge as experiment  # noqa: E402
from support.errors import UserError, run_main  # noqa: E402
from support.flags import (DTYPES, count, flag, non_negative_float, parse_flags, path_text,  # noqa: E402
                           positive_int)
from support.outputs import check_output_file  # noqa: E402


@dataclass
class RepeatConfig:
    """Which cell to train again, and how."""
    out: str = flag("experiments/results", "the experiment's folder (its cells.jsonl)", path_text)
    task: str = flag("knowledge", "the cell's task", choices=["form", "knowledge"])
    method: str = flag("aligner", "the cell's method",
                       choices=["base", *sorted({m.kind for m in experiment.METHODS})])
    n: int = flag(1, "its size: Aligner tokens, or the LoRA rank", count)
    lr: float = flag(0.01, "its learning rate (0 for the base model)", non_negative_float)
    seed: int = flag(1, "its seed", count)
    start: int = flag(2, "its start layer", count)
    steps: str = flag(None, "its checkpoints, comma-separated (default: the task's main budget)")
    attention: str = flag("einsum", "the attention kernel to train it under now", choices=["einsum", "sdpa"])
    threads: int = flag(1, "CPU threads (the experiment's workers: one each on two cores)", positive_int)
    record: str = flag(None, "append the new row to this JSON-lines file (OUT/repeats.jsonl: the report's "
                       "kernel check reads it)", path_text)


def checkpoints(cfg: RepeatConfig, design) -> list:
    if cfg.steps is None:
        return [experiment.budget(design, cfg.task)]
    try:
        steps = [int(s) for s in cfg.steps.split(",")]
    except ValueError:
        raise UserError(f"--steps takes whole numbers separated by commas, got {cfg.steps!r}") from None
    if not steps or steps != sorted(set(steps)) or steps[0] < 0:
        raise UserError(f"--steps must rise from 0 or more, got {cfg.steps!r}")
    return steps


def stored_cell(cfg: RepeatConfig) -> dict:
    """The row of OUT/cells.jsonl that the flags name (its dtype, batch and people as it has them)."""
    rows = experiment.read_cells(Path(cfg.out) / "cells.jsonl").values()
    design = experiment.ExperimentConfig(out=cfg.out)
    want = {"task": cfg.task, "method": cfg.method, "n": cfg.n, "lr": cfg.lr, "seed": cfg.seed,
            "start": cfg.start, "checkpoints": checkpoints(cfg, design)}
    found = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    if not found:
        raise UserError(f"{cfg.out}/cells.jsonl has no cell {want}: see its rows for the values")
    return found[0]


def repeat(cfg: RepeatConfig) -> int:
    row = stored_cell(cfg)
    if cfg.record:
        check_output_file(cfg.record, [Path(cfg.out) / "cells.jsonl", Path(cfg.out) / "answers.jsonl"])
    torch.set_num_threads(cfg.threads)
    design = experiment.ExperimentConfig(out=cfg.out, dtype=row["dtype"], quick=row["quick"],
                                         people=row.get("people", 16))  # the tasks the cell trained on
    cell = {k: v for k, v in row.items() if k not in ("at", "params", "seconds", "gates", "bias_norms")}
    cell["attention"] = cfg.attention
    path = experiment.model_dir(None)
    with tempfile.TemporaryDirectory() as scratch:
        bench = experiment.Bench(experiment.load_model(path, "cpu", DTYPES[row["dtype"]]),
                                 experiment.Tokenizer(path), path,
                                 experiment.make_tasks(design, Path(scratch)))
        experiment.write_tasks(bench.tasks)
        again, _ = experiment.run_cell(cell, bench)
    print(f"cell {experiment.key(cell)}")
    print(f"stored: {row.get('attention', 'not recorded')} kernel; now: {cfg.attention}, "
          f"{cfg.threads} thread(s)")
    names = [k for k in row["at"][0] if k != "step"]
    print(f"{'step':>5} " + " ".join(f"{n + ' then':>16} {n + ' now':>16}" for n in names))
    for then, now in zip(row["at"], again["at"]):
        print(f"{then['step']:5d} " + " ".join(f"{then[n]:16.6g} {now[n]:16.6g}" for n in names))
    if cfg.record:
        with open(cfg.record, "a") as f:
            f.write(json.dumps(dict(again, attention=cfg.attention, threads=cfg.threads)) + "\n")
    same = row["at"] == again["at"]
    print("the cell repeats: every score equal" if same else "the cell does not repeat: a score differs")
    return 0 if same else 1


def main(argv=None):
    run_main(lambda: sys.exit(repeat(*parse_flags(argv, __doc__, RepeatConfig))))


if __name__ == "__main__":
    main()
