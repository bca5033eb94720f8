"""Modify to learn: graded lessons in which you write the Aligner's parts yourself.

    python lessons.py list                      # the lessons and their pages
    python lessons.py start 3                   # a copy of the primer, lesson 3's code left for you
    python lessons.py check 3                   # grade your copy: pass, or the difference and a hint
    python lessons.py check all --dir .         # grade the project itself (a teacher's check)
    python lessons.py hint 3 --level 2          # 1: the idea, 2: the shapes, 3: the einsum strings
    python lessons.py solution 3                # the reference and your diff, once your check passes
    python lessons.py catalog 3                 # the graders against the catalog of wrong answers
    python lessons.py lab tanh                  # an open lab: a variant trained and measured

`start` copies the primer (model.py, aligner.py, data.py, generate.py, train.py, dpo.py) and the
support package into a folder of yours (default ~/aligner-lessons/lesson-N), with the lesson's code
replaced by a stub that says what to write and raises NotImplementedError. The code is found by
name (lessons/catalog.py), so a refactor that moves it breaks a test, not a class. `check` runs
the lesson's graders (lessons/graders.py) on that folder in a fresh process. Neither command
writes inside the project. `solution` shows the reference only after your check passes (a teacher
adds --teacher). Read the lesson's page first: lessons/README.md lists them.
Read next: lessons/README.md.
"""
import argparse
import difflib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "lessons"))

from catalog import HINTS, LESSONS, Blank, region  # noqa: E402
from support.errors import UserError, run_main  # noqa: E402
from support.flags import path_text, positive_int  # noqa: E402
from support.outputs import check_output_dir  # noqa: E402
from support.temporary import new_directory  # noqa: E402

COPIED = ["model.py", "aligner.py", "data.py", "generate.py", "train.py", "dpo.py"]


def lesson(text: str):
    numbers = {str(entry.number): entry for entry in LESSONS}
    if text not in numbers:
        raise UserError(f"no lesson {text!r}: the lessons are {', '.join(numbers)} (python lessons.py list)")
    return numbers[text]


def blank(source: str, b: Blank) -> str:
    """`source` with the block that `b` names replaced by its stub, indented as the block was."""
    lines = source.splitlines()
    first, last = region(source, b)
    indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
    return "\n".join(lines[:first] + [indent + s for s in b.stub.splitlines()] + lines[last:]) + "\n"


def start(number: str, folder, force: bool):
    """A copy of the primer in a folder of the student's own: never inside the project, and made as
    every output directory is (support/outputs.py): never over files without --force, and with --force
    only over a folder that `start` made, holding no file it did not write (your notes stay yours)."""
    entry = lesson(number)
    folder = Path(folder or default_folder(entry.number)).expanduser()
    if folder.resolve() == ROOT or ROOT in folder.resolve().parents:
        raise UserError(f"{folder} is inside the project; start a lesson in a folder of your own")
    check_output_dir(folder, force=force)
    with new_directory(folder, f"lessons.py start {entry.number}") as tmp:
        shutil.copytree(ROOT / "support", tmp / "support", ignore=shutil.ignore_patterns("__pycache__"))
        for name in COPIED:
            source = (ROOT / name).read_text()
            for b in (b for b in entry.blanks if b.file == name):
                source = blank(source, b)
            (tmp / name).write_text(source)
    print(f"lesson {entry.number}, {entry.title}: your copy is in {folder}")
    files = ", ".join(sorted({b.file for b in entry.blanks}))
    print(f"read lessons/{entry.page}, write the stubs in {files}, then: python lessons.py check "
          f"{entry.number} --dir {folder}")


def check(number: str, folder) -> int:
    entries = LESSONS if number == "all" else [lesson(number)]
    folder = Path(folder or Path.home() / "aligner-lessons" / f"lesson-{entries[0].number}").expanduser()
    if not (folder / "model.py").is_file():
        raise UserError(f"{folder} holds no lesson copy: python lessons.py start {number} --dir {folder}")
    names = list(dict.fromkeys(g for e in entries for g in e.graders))
    graders = ROOT / "lessons" / "graders.py"
    r = subprocess.run([sys.executable, str(graders), str(folder), *names], cwd=folder)
    return r.returncode


def default_folder(number) -> Path:
    return Path.home() / "aligner-lessons" / f"lesson-{number}"


def hint(number: str, level: int):
    entry = lesson(number)
    names = ["the idea", "the shapes", "the einsum strings, or the calls"]
    for i in range(level):
        print(f"{i + 1}. {names[i]}: {HINTS[entry.number][i]}")
    if level < 3:
        print(f"(more: python lessons.py hint {entry.number} --level {level + 1})")


def block(source: str, b: Blank) -> list:
    """The lines of the block `b` names in `source`, or all of it if the markers are gone."""
    try:
        first, last = region(source, b)
    except (LookupError, StopIteration, SyntaxError):
        return source.splitlines()
    return source.splitlines()[first:last]


def solution(number: str, folder, teacher: bool):
    """The reference code of the lesson, and the student's diff against it: after the check passes in
    the student's folder, or at once with --teacher."""
    entry = lesson(number)
    folder = Path(folder or default_folder(entry.number)).expanduser()
    if not teacher:
        if not (folder / "model.py").is_file():
            raise UserError(f"{folder} holds no lesson copy: the solution shows once `python lessons.py "
                            "check "
                            f"{entry.number} --dir {folder}` passes (a teacher: --teacher)")
        if check(str(entry.number), folder) != 0:
            raise UserError(f"lesson {entry.number}'s check does not pass yet in {folder}: the solution "
                            "shows once "
                            f"it does (python lessons.py hint {entry.number} helps; a teacher: --teacher)")
    for b in entry.blanks:
        reference = block((ROOT / b.file).read_text(), b)
        print(f"\n# the reference: {b.file}:{b.function}\n" + "\n".join(reference))
        mine = folder / b.file
        if mine.is_file():
            diff = list(difflib.unified_diff(reference, block(mine.read_text(), b), "reference",
                                             f"yours ({mine})",
                                             lineterm=""))
            print("\n".join(diff) if diff else "# yours is the same")


def catalog(numbers: list) -> int:
    """Every wrong answer of the lessons' catalog on a temporary copy: 0 when the graders catch them all."""
    numbers = [str(lesson(n).number) for n in numbers]
    return subprocess.run([sys.executable, str(ROOT / "lessons" / "trial.py"), *numbers]).returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the lessons and their pages")
    s = sub.add_parser("start", help="copy the primer with a lesson's code left for you to write")
    s.add_argument("lesson", help="the lesson's number")
    s.add_argument("--dir", type=path_text, help="your folder (default: ~/aligner-lessons/lesson-N)")
    s.add_argument("--force", action="store_true", help="start over in a folder that `start` made (your "
                   "edits to its copies are lost; a file it did not write stops it)")
    lab = sub.add_parser("lab", help="an open lab: train a variant on the embedded model and measure it")
    lab.add_argument("name", choices=["tanh", "layer-gate", "start-layer"])
    lab.add_argument("--steps", type=positive_int, default=40, help="optimizer steps of 8 (default 40)")
    lab.add_argument("--prompts", type=positive_int, default=32, help="held-out prompts scored (default 32)")
    lab.add_argument("--seeds", type=positive_int, default=2, help="seeds per variant (default 2)")
    h = sub.add_parser("hint", help="a hint for a lesson, in levels")
    h.add_argument("lesson", help="the lesson's number")
    h.add_argument("--level", type=int, choices=[1, 2, 3], default=1,
                   help="1: the idea, 2: the shapes, 3: the einsum strings (default 1)")
    so = sub.add_parser("solution", help="the reference and your diff, once your check passes")
    so.add_argument("lesson", help="the lesson's number")
    so.add_argument("--dir", type=path_text, help="your folder (default: ~/aligner-lessons/lesson-N)")
    so.add_argument("--teacher", action="store_true", help="show it without grading a folder")
    cat = sub.add_parser("catalog", help="the graders against the catalog of wrong answers "
                                         "(lessons/mistakes.py)")
    cat.add_argument("lessons", nargs="*", help="lesson numbers (default: all)")
    c = sub.add_parser("check", help="grade a lesson (or all) in a folder")
    c.add_argument("lesson", help="the lesson's number, or all")
    c.add_argument("--dir", type=path_text, help="the folder to grade (default: ~/aligner-lessons/lesson-N)")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for entry in LESSONS:
            print(f"{entry.number}. {entry.title:<52} lessons/{entry.page}")
    elif args.cmd == "lab":
        from labs import lab as run_lab

        run_main(run_lab, args.name, args.steps, args.prompts, args.seeds)
    elif args.cmd == "start":
        run_main(start, args.lesson, args.dir, args.force)
    elif args.cmd == "hint":
        run_main(hint, args.lesson, args.level)
    elif args.cmd == "solution":
        run_main(solution, args.lesson, args.dir, args.teacher)
    elif args.cmd == "catalog":
        sys.exit(run_main(catalog, args.lessons))
    else:
        sys.exit(run_main(check, args.lesson, args.dir))


if __name__ == "__main__":
    main()
