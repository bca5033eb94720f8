"""lessons.py: the project passes every lesson's check; each blanked copy fails its own (wrong answers:
tests/test_catalog.py); start and check never write inside the project and start never overwrites a
student's work; solution and hint give the answer only when they should; the pages name only functions
that exist, point at the student's copy rather than the answer, and every command they show runs."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "lessons"))
from catalog import LESSONS  # noqa: E402

PAGES = sorted((ROOT / "lessons").glob("*.md"))


def lessons(*args, home=None):
    env = {**os.environ, **({"HOME": str(home)} if home else {})}
    return subprocess.run([sys.executable, str(ROOT / "lessons.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def project_files() -> dict:
    skip = {".venv", "checkpoints", "__pycache__", ".pytest_cache", ".git", "runs"}
    return {str(p): p.stat().st_mtime_ns for p in ROOT.rglob("*") if not set(p.relative_to(ROOT).parts) & skip}


def test_the_project_passes_every_lesson():
    """The teacher's command, `python lessons.py check all --dir .`, as the pages show it."""
    before = project_files()
    r = lessons("check", "all", "--dir", ".")
    graders = {g for lesson in LESSONS for g in lesson.graders}
    assert r.returncode == 0 and r.stdout.count("PASS") == len(graders), r.stdout + r.stderr
    assert project_files() == before


def graded(text: str) -> dict:
    """{folder: its PASS/FAIL lines} from graders.py --each."""
    out, folder = {}, None
    for line in text.splitlines():
        if line.startswith("== "):
            folder = Path(line[3:]).name
        elif line.startswith(("PASS", "FAIL")):
            out.setdefault(folder, []).append(line)
    return out


def test_blanked_copies_fail_every_grader_as_not_written_yet(tmp_path):
    """Each lesson's blanked copy fails every one of its graders ("not written yet"). All folders graded in
    one process (graders.py --each), as `lessons.py check N --dir FOLDER` would grade each. Wrong answers:
    tests/test_catalog.py."""
    before = project_files()
    specs = []
    for lesson in LESSONS:
        assert lessons("start", lesson.number, "--dir", tmp_path / f"lesson{lesson.number}").returncode == 0
        specs.append(f"{tmp_path / f'lesson{lesson.number}'}={','.join(lesson.graders)}")
    r = subprocess.run([sys.executable, str(ROOT / "lessons" / "graders.py"), "--each", *specs], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    results = graded(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    for lesson in LESSONS:
        lines = results[f"lesson{lesson.number}"]
        assert len(lines) == len(lesson.graders) and all("FAIL" in x and "not written yet" in x for x in lines), lines
    assert project_files() == before


def test_start_keeps_a_students_work_and_the_project_out_of_reach(tmp_path):
    assert lessons("start", 2, "--dir", tmp_path).returncode == 0
    (tmp_path / "model.py").write_text("my work")
    r = lessons("start", 2, "--dir", tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr
    assert (tmp_path / "model.py").read_text() == "my work"
    assert lessons("start", 2, "--dir", tmp_path, "--force").returncode == 0
    assert "NotImplementedError" in (tmp_path / "model.py").read_text()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("not a lesson")
    r = lessons("start", 2, "--dir", notes, "--force")  # --force never deletes a folder start did not make
    assert r.returncode == 2 and "not written by this project" in r.stderr and (notes / "mine.txt").exists()
    before = project_files()
    for args in (["start", 2, "--dir", ROOT / "lessons" / "mine"], ["start", 9], ["check", 2, "--dir", tmp_path / "x"]):
        r = lessons(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert project_files() == before


def names_exist(file: str, qualname: str) -> bool:
    node = ast.parse((ROOT / file).read_text())
    for part in qualname.split("."):
        node = next((n for n in getattr(node, "body", []) if getattr(n, "name", None) == part), None)
        if node is None:
            return False
    return True


def test_the_pages_name_only_functions_that_exist():
    pattern = r"`([a-z_/]+\.py):([A-Za-z_.]+)`"
    named = [(p.name, f, q) for p in PAGES for f, q in re.findall(pattern, p.read_text())]
    assert len(named) >= 15
    missing = [n for n in named if not names_exist(n[1], n[2])]
    assert not missing


def test_every_command_on_the_pages_runs(tmp_path):
    """In page order, with HOME in a temporary folder (the default lesson folders go there); the labs
    with one step, one prompt and one seed."""
    pattern = r"^python lessons\.py ([^#\n]*?)\s*(?:#.*)?$"
    commands = [c for p in PAGES for c in re.findall(pattern, p.read_text(), re.M)]
    commands = list(dict.fromkeys(c.replace("`", "").strip() for c in commands))
    commands.remove("check all --dir .")  # run by test_the_project_passes_every_lesson
    assert any(c.startswith("lab") for c in commands) and any(c.startswith("start") for c in commands)
    for command in commands:
        quick = ["--steps", "1", "--prompts", "1", "--seeds", "1"] if command.startswith("lab") else []
        r = lessons(*command.split(), *quick, home=tmp_path)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, (command, r.stdout, r.stderr)


def test_the_pages_point_at_the_students_copy_not_at_the_answer():
    """A page's "Read" paragraph names no function the lesson blanks: in the project's files that is the answer."""
    for lesson in LESSONS:
        page = (ROOT / "lessons" / lesson.page).read_text()
        read = page.split("**Read", 1)[1].split("\n\n", 1)[0]
        assert "your copy" in read, lesson.page
        named = re.findall(r"`([a-z_/]+\.py):([A-Za-z_.]+)`", read)
        blanked = {(b.file, b.function) for b in lesson.blanks}
        assert not set(named) & blanked, (lesson.page, set(named) & blanked)


def test_hints_come_in_three_levels_and_the_solution_only_after_a_pass(tmp_path):
    outs = [lessons("hint", 3, "--level", level).stdout for level in (1, 2, 3)]
    assert [o.count("\n1. ") + o.count("\n2. ") + o.count("\n3. ") + o.startswith("1. ") for o in outs] == [1, 2, 3]
    assert "btkge,bnke->bkgtn" in outs[2] and "btkge" not in outs[1]
    folder = tmp_path / "six"
    assert lessons("start", 6, "--dir", folder).returncode == 0
    r = lessons("solution", 6, "--dir", folder)
    assert r.returncode == 2 and "does not pass yet" in r.stderr and "wo.float()" not in r.stdout
    teacher = lessons("solution", 6, "--teacher")
    assert teacher.returncode == 0 and "return wo.float() @ per_head.reshape(-1)" in teacher.stdout
    shutil.copy(ROOT / "aligner.py", folder / "aligner.py")  # the right answer: the check passes
    r = lessons("solution", 6, "--dir", folder)
    assert r.returncode == 0 and "PASS" in r.stdout and "# yours is the same" in r.stdout, r.stdout + r.stderr
