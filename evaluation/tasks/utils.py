"""What the local lm-eval tasks' YAML files name with `!function`: the reader of their JSONL documents
(written by evaluation/make_tasks.py) and the prompt and score of the experiment's two tasks.

    python evaluate.py --tasks aligner_mc,aligner_arith,aligner_form,aligner_knowledge

lm-eval imports this file itself (by its path, beside the YAML). Read next: docs/evaluation.md.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for folder in (ROOT, ROOT / "data", ROOT / "experiments"):
    sys.path.insert(0, str(folder)) if str(folder) not in sys.path else None


def load(task: str, splits: list, **_metadata):
    """The task's splits, each from HERE/{task}_{split}.jsonl, as lm-eval's datasets."""
    import json

    import datasets

    def rows(split):
        return [json.loads(line) for line in (HERE / f"{task}_{split}.jsonl").read_text().splitlines()]

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows(split)) for split in splits})


def form_prompt(doc: dict) -> str:
    """A held-out instruction in Alpaca's template, as the form Aligner was trained (data.py)."""
    from data import format_prompt

    return format_prompt(doc["instruction"])


def form_hit(doc: dict, results: list) -> dict:
    """1 when the answer follows the letter form (demo.py's check), else 0."""
    from make_form_data import follows_form

    return {"follows_form": float(follows_form(results[0]))}


def city_hit(doc: dict, results: list) -> dict:
    """1 when the answer names the person's city and no other city of the task's list, else 0."""
    from form_vs_knowledge import city_check

    return {"names_city": float(city_check(results[0], doc["city"]))}
