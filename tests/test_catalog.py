"""The graders against the catalog of wrong answers (lessons/mistakes.py): every entry is an edit inside
its lesson's block that still finds its text, and the lesson's graders fail it first where the
catalog says, with the words that name the mistake (the right answer passing every grader).

    .venv/bin/python -m pytest -q tests/test_catalog.py                # a sample of the catalog (~40 s)
    CATALOG=all .venv/bin/python -m pytest -q tests/test_catalog.py    # all of it (~3 min on 2 cores)
    python lessons.py catalog                                           # the same, one line per entry
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "lessons"))
from catalog import LESSONS  # noqa: E402
from mistakes import MISTAKES, SAMPLE, AnchorLost, Mistake, apply  # noqa: E402

MINIMUM = {1: 8, 2: 4, 3: 8, 4: 8, 5: 8, 6: 4, 7: 4}


def test_the_catalog_is_large_enough_and_names_real_graders():
    for lesson, least in MINIMUM.items():
        entries = [m for m in MISTAKES if m.lesson == lesson]
        assert len(entries) >= least, f"lesson {lesson}: {len(entries)} wrong answers, at least {least}"
        assert {m.first for m in entries} <= set(LESSONS[lesson - 1].graders)
    keys = [f"{m.lesson}: {m.name}" for m in MISTAKES]
    assert len(set(keys)) == len(keys) and set(SAMPLE) <= set(keys)


def test_every_entry_is_an_edit_inside_its_lesson_block():
    for m in MISTAKES:
        source = (ROOT / m.file).read_text()
        assert apply(source, m) != source, m.name


def test_an_entry_whose_text_left_the_block_stops_with_its_name():
    lost = Mistake(3, "a lost anchor", "model.py", [("no such text in the block", "x")], "prefix_one_token", "")
    with pytest.raises(AnchorLost, match="a lost anchor"):
        apply((ROOT / "model.py").read_text(), lost)
    outside = Mistake(3, "outside the block", "model.py", [("def rope(", "def rope2(")], "prefix_one_token", "")
    with pytest.raises(AnchorLost, match="outside the block"):  # rope is lesson 2's, not lesson 3's
        apply((ROOT / "model.py").read_text(), outside)


def test_the_graders_fail_each_wrong_answer_first_where_the_catalog_says():
    """One process (lessons/trial.py), one temporary copy per lesson; the right answer must pass."""
    every = os.environ.get("CATALOG") == "all"
    only = [] if every else [a for key in SAMPLE for a in ("--only", key)]
    r = subprocess.run([sys.executable, str(ROOT / "lessons" / "trial.py"), *only], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    lines = [x for x in r.stdout.splitlines() if x.split(" ", 1)[0] in ("CAUGHT", "MISSED", "ELSEWHERE", "UNSPECIFIC")]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "FAILS" not in r.stdout and r.stdout.count("the right answer PASSES") >= 1
    assert len(lines) == (len(MISTAKES) if every else len(SAMPLE)) and all(x.startswith("CAUGHT") for x in lines)
