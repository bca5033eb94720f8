"""lessons.py: the project passes every lesson's check; each blanked copy fails its own; wrong
answers fail with a message that points at the mistake; start and check never write inside the
project and start never overwrites a student's work; the pages name only functions that exist and
every command they show runs."""
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


WRONG = {  # (lesson, the stub's first line, the wrong code, the words the check must print)
    "gate before the softmax": (3, "if prefix is not None:", """if prefix is not None:
    tokens, gate = prefix
    pk, pv = self.prefix_kv(tokens, x.dtype) if cache is None else cache.aligner_kv
    pk, pv = pk.expand(b, *pk.shape[-3:]), pv.expand(b, *pv.shape[-3:])
    g_heads = gate.to(y.dtype).expand(b, self.n_heads).view(b, k_heads, g, 1, 1)
    p_att = (g_heads * torch.einsum("btkge,bnke->bkgtn", xq, pk) / math.sqrt(e)).softmax(-1)
    y = y + torch.einsum("bkgtn,bnke->btkge", p_att, pv)""", "not the scores inside it"),
    "RoPE on the prefix": (3, "if prefix is not None:", """if prefix is not None:
    tokens, gate = prefix
    pk, pv = self.prefix_kv(tokens, x.dtype) if cache is None else cache.aligner_kv
    pk, pv = pk.expand(b, *pk.shape[-3:]), pv.expand(b, *pv.shape[-3:])
    pk = apply_rope(pk, rope[0][:, :pk.shape[1]], rope[1][:, :pk.shape[1]])
    p_att = (torch.einsum("btkge,bnke->bkgtn", xq, pk) / math.sqrt(e)).softmax(-1)
    py = torch.einsum("bkgtn,bnke->btkge", p_att, pv)
    y = y + gate.to(y.dtype).expand(b, self.n_heads).view(b, 1, k_heads, g, 1) * py""",
                           "the prefix keys get RoPE"),
    "scores not scaled": (1, "# causal attention: y", """scores = torch.einsum("btkge,bske->bkgts", xq, xk)
att = (scores.float() + mask).softmax(-1).type_as(xq)
y = torch.einsum("bkgts,bske->btkge", att, xv)""", "look at the scale of the scores"),
}


def write_wrong_answer(folder: Path, mistake: str):
    _, first, code, _ = WRONG[mistake]
    lines = (folder / "model.py").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    j = next(j for j in range(i, len(lines)) if "NotImplementedError" in lines[j]) + 1
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    (folder / "model.py").write_text("\n".join(lines[:i] + [indent + c for c in code.splitlines()] + lines[j:]))


def graded(text: str) -> dict:
    """{folder: its PASS/FAIL lines} from graders.py --each."""
    out, folder = {}, None
    for line in text.splitlines():
        if line.startswith("== "):
            folder = Path(line[3:]).name
        elif line.startswith(("PASS", "FAIL")):
            out.setdefault(folder, []).append(line)
    return out


def test_blanked_copies_fail_and_wrong_answers_are_pointed_at(tmp_path):
    """Each lesson's blanked copy fails every one of its graders ("not written yet"); each wrong
    answer fails with the words that point at it. All folders graded in one process (graders.py
    --each), as `lessons.py check N --dir FOLDER` would grade each."""
    before = project_files()
    specs = []
    for lesson in LESSONS:
        assert lessons("start", lesson.number, "--dir", tmp_path / f"lesson{lesson.number}").returncode == 0
        specs.append(f"{tmp_path / f'lesson{lesson.number}'}={','.join(lesson.graders)}")
    for k, mistake in enumerate(sorted(WRONG)):
        number = WRONG[mistake][0]
        shutil.copytree(tmp_path / f"lesson{number}", tmp_path / f"wrong{k}")
        write_wrong_answer(tmp_path / f"wrong{k}", mistake)
        specs.append(f"{tmp_path / f'wrong{k}'}={','.join(LESSONS[number - 1].graders)}")
    r = subprocess.run([sys.executable, str(ROOT / "lessons" / "graders.py"), "--each", *specs], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    results = graded(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    for lesson in LESSONS:
        lines = results[f"lesson{lesson.number}"]
        assert len(lines) == len(lesson.graders) and all("FAIL" in x and "not written yet" in x for x in lines), lines
    for k, mistake in enumerate(sorted(WRONG)):
        assert any(WRONG[mistake][3] in x for x in results[f"wrong{k}"] if x.startswith("FAIL")), results[f"wrong{k}"]
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
