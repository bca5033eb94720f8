"""Writes the local lm-eval tasks' documents, evaluation/tasks/*.jsonl, from small tables here (no
benchmark's questions are copied): evaluate.py, serve.py + lm-eval and the Hugging Face export run
them with no hub.

    python evaluation/make_tasks.py        # deterministic; the JSONL files are committed

  aligner_mc         multiple choice in MMLU's format ({question, subject, choices[4], answer: index});
                     "dev" (5, the few-shot examples, as MMLU's) and "test" (60)
  aligner_arith      grade-school word problems in GSM8K's format ({question, answer: the working with
                     <<a+b=c>> notes, then "#### N"}); "train" (8, few-shot) and "test" (40)
  aligner_form       the experiment's form task: the 64 held-out instructions of data/form_heldout.json,
                     answered in Alpaca's template; a hit follows the letter form (demo.py's check)
  aligner_knowledge  the experiment's knowledge task: the invented people of
                     experiments/form_vs_knowledge.py, asked in its two held-out wordings; a hit names
                     the person's city and no other
The YAML files beside them are lm-eval's task configurations; tasks/utils.py reads the JSONL.
Read next: evaluation/tasks/utils.py, then docs/evaluation.md.
"""
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "tasks"

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
ANIMALS = {"bird": "wings", "fish": "fins", "dog": "paws", "horse": "hooves", "snake": "scales"}
OPPOSITES = {"hot": "cold", "tall": "short", "fast": "slow", "early": "late", "full": "empty", "wet": "dry",
             "loud": "quiet", "open": "closed"}
THINGS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "coins"]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon"]


def four(rng, right, wrong: list) -> tuple:
    """(the four choices in a random order, the index of the right one)."""
    choices = [right] + rng.sample([w for w in wrong if w != right], 3)
    rng.shuffle(choices)
    return [str(c) for c in choices], choices.index(right)


def mc_question(rng, i: int) -> dict:
    """One MMLU-style question of one of five kinds, in turn."""
    kind = i % 5
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        choices, answer = four(rng, a + b, [a + b + d for d in (-2, -1, 1, 2, 10)])
        return {"question": f"What is {a} + {b}?", "subject": "elementary_mathematics", "choices": choices,
                "answer": answer}
    if kind == 1:
        nums = rng.sample(range(10, 99), 4)
        return {"question": "Which of these numbers is the largest?", "subject": "elementary_mathematics",
                "choices": [str(n) for n in nums], "answer": nums.index(max(nums))}
    if kind == 2:
        word = rng.choice(sorted(OPPOSITES))
        choices, answer = four(rng, OPPOSITES[word], list(OPPOSITES.values()))
        return {"question": f"What is the opposite of \"{word}\"?", "subject": "english", "choices": choices,
                "answer": answer}
    if kind == 3:
        animal = rng.choice(sorted(ANIMALS))
        choices, answer = four(rng, ANIMALS[animal], list(ANIMALS.values()))
        return {"question": f"What does a {animal} have?", "subject": "biology", "choices": choices,
                "answer": answer}
    colour = rng.choice(COLOURS)
    choices, answer = four(rng, colour, ["table", "river", "seven", "quickly", "window"])
    return {"question": "Which of these words is a colour?", "subject": "english", "choices": choices,
            "answer": answer}


def arith_problem(rng) -> dict:
    """One GSM8K-style word problem: two steps, the working with GSM8K's <<calculation=result>> notes."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(3, 20), rng.randint(2, 9), rng.randint(2, 5)
    total, left = a + b * c, a + b * c - c
    question = (f"{name} has {a} {thing}. {name} buys {c} bags with {b} {thing} in each bag, then gives "
                f"away {c} {thing}. How many {thing} does {name} have now?")
    working = (f"The bags hold {b} * {c} = <<{b}*{c}={b * c}>>{b * c} {thing}.\n"
               f"Then {name} has {a} + {b * c} = <<{a}+{b * c}={total}>>{total} {thing}.\n"
               f"After giving away {c}, {name} has {total} - {c} = <<{total}-{c}={left}>>{left} {thing}.\n"
               f"#### {left}")
    return {"question": question, "answer": working}


def knowledge_docs() -> list:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "experiments"))
    from form_vs_knowledge import DESIGN, knowledge_task

    task = knowledge_task(DESIGN["budgets"]["people"], False, OUT)
    return [{"question": p.prompt, "city": p.answer} for p in task.probes["score"]]


def form_docs() -> list:
    sys.path.insert(0, str(ROOT / "data"))
    from make_form_data import reuses_template

    records = json.loads((ROOT / "data" / "form_heldout.json").read_text())
    return [{"instruction": r["instruction"], "kind": "reuse" if reuses_template(r["instruction"]) else "new"}
            for r in records]


def write(name: str, docs: list):
    (OUT / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    print(f"wrote {OUT / name}.jsonl ({len(docs)} documents)")


def main():
    rng = random.Random(33)
    mc = [mc_question(rng, i) for i in range(65)]
    write("aligner_mc_dev", mc[:5])
    write("aligner_mc_test", mc[5:])
    arith = [arith_problem(rng) for _ in range(48)]
    write("aligner_arith_train", arith[:8])
    write("aligner_arith_test", arith[8:])
    write("aligner_form_test", form_docs())
    write("aligner_knowledge_test", knowledge_docs())


if __name__ == "__main__":
    main()
