"""Try the graders on the catalog of wrong answers (lessons/mistakes.py): for each lesson, one temporary
copy of the primer; the unedited copy must pass every grader of the lesson, then each wrong answer is
written in, graded until the first FAIL, and taken out again.

    python lessons/trial.py [LESSON ...] [--only "3: NAME" ...]     (python lessons.py catalog runs this)

Prints a line per entry: CAUGHT (the expected grader failed first, with the expected words), or
MISSED / ELSEWHERE / UNSPECIFIC with what happened; exits 1 unless every entry is CAUGHT and every
unedited copy passes. Runs in a process of its own: it imports each copy's modules afresh.
Read next: ../tests/test_catalog.py.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # an edit of the same size within a second must not reuse a stale .pyc
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import graders  # noqa: E402
from catalog import LESSONS  # noqa: E402
from mistakes import MISTAKES, apply  # noqa: E402

COPIED = ["model.py", "aligner.py", "data.py", "generate.py", "train.py", "dpo.py"]
PRIMER = ("model", "aligner", "data", "generate", "train", "dpo", "support")


def fresh():
    """Forget the copy's modules, so the next grader imports the files as they are now."""
    for name in [m for m in sys.modules if m.split(".")[0] in PRIMER]:
        del sys.modules[name]


def first_failure(names: list):
    """(grader, message) of the first grader that fails, or (None, "") if all pass."""
    for name in names:
        fresh()
        ok, detail = graders.grade(name)
        if not ok:
            return name, detail
    return None, ""


def key(m) -> str:
    return f"{m.lesson}: {m.name}"


def outcome(m, failed: str, message: str) -> str:
    if failed is None:
        return "MISSED"
    if failed != m.first:
        return "ELSEWHERE"
    return "CAUGHT" if m.words in message else "UNSPECIFIC"


def try_lesson(number: int, only: set, folder: Path) -> int:
    """Grade the lesson's right answer and each wrong one in `folder`; print a line each; the number
    of entries not CAUGHT (the right answer failing counts as one)."""
    names = LESSONS[number - 1].graders
    start = time.time()
    failed, message = first_failure(names)
    graded = "PASSES" if failed is None else f"FAILS {failed}: {message}"
    print(f"lesson {number}: the right answer {graded} ({time.time() - start:.1f} s)", flush=True)
    bad = failed is not None
    for m in (m for m in MISTAKES if m.lesson == number and (not only or key(m) in only)):
        path = folder / m.file
        right = path.read_text()
        path.write_text(apply(right, m))
        try:
            start = time.time()
            failed, message = first_failure(names)
        finally:
            path.write_text(right)
        verdict = outcome(m, failed, message)
        bad += verdict != "CAUGHT"
        expected = "" if verdict == "CAUGHT" else f" [expected {m.first}: ...{m.words}...]"
        took = f"({time.time() - start:.1f} s)"
        print(f"{verdict:<10} {m.lesson}: {m.name} -> {failed}: {message}{expected} {took}", flush=True)
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lessons", nargs="*", type=int, help="lesson numbers (default: all)")
    p.add_argument("--only", action="append", default=[], help='one entry, "LESSON: NAME" (repeatable)')
    args = p.parse_args(argv)
    only = set(args.only)
    numbers = args.lessons or sorted({m.lesson for m in MISTAKES if not only or key(m) in only})
    graders.quiet()
    bad, work = 0, Path(tempfile.mkdtemp(prefix="aligner-catalog-"))
    try:
        for number in numbers:
            folder = work / f"lesson-{number}"
            shutil.copytree(ROOT / "support", folder / "support",
                            ignore=shutil.ignore_patterns("__pycache__"))
            for name in COPIED:
                shutil.copy(ROOT / name, folder / name)
            sys.path.insert(0, str(folder))
            bad += try_lesson(number, only, folder)
            sys.path.remove(str(folder))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
