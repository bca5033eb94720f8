"""The project's own tests held to the graders' standard: each wrong answer of the lessons' catalog
(lessons/mistakes.py), written into a temporary copy of the project's primer, must make the project's
tests fail. The test files of the project that cover a lesson's code (PROJECT_TESTS) missed some;
the graders that catch those run here on the project itself, one test each (PROPERTIES).

    .venv/bin/python -m pytest -q tests/test_catalog_project.py   # the properties, and one entry (~1 min)
    .venv/bin/python tests/test_catalog_project.py [--without-properties | --properties-only] [LESSON ...]
        [--only "5: NAME" ...]

The second prints, per entry, CAUGHT (some test failed) or MISSED; --without-properties leaves this
file's own tests out, which measures what the rest of the suite catches alone.

Measured 2026-12-02/03 (2 busy cores): the project's tests alone caught lesson 1: 9 of 10, 2: 5 of 8,
3: 9 of 12, 4: 10 of 12, 5: 6 of the 8 run (the other 3, loss scales like the 2 missed, not run: 500 s
each when test_train_generate.py passes), 6: 3 of 5, 7: 7 of 8. The 14 missed and the 3 not run are
all caught by PROPERTIES (--properties-only). Missed: bfloat16 (attention, prefix x2, merge x2), LLaMA-3.1
rope_factor, KVCache.update's rows (every row, per-row pos), one Aligner per row, tokens' start (small,
frozen), a mean of row means, micro-batch scale, logits for log-probabilities.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lessons"))
from mistakes import MISTAKES, apply  # noqa: E402

HERE = "tests/test_catalog_project.py::test_the_primer_has_the_property"
PROJECT_TESTS = {  # the project's tests of each lesson's code (pytest arguments)
    1: ["tests/test_model.py", "-k", "logits_equal_transformers or kv_cache_decoding or sdpa_path"],
    2: ["tests/test_model.py", "-k", "logits_equal_transformers or kv_cache_decoding", "tests/test_batched_generation.py"],
    3: ["tests/test_model.py", "-k", "zero_gates or aligner_equals_peft or per_layer or kv_cache_decoding",
        "tests/test_batched_generation.py"],
    4: ["tests/test_model.py", "-k", "zero_gates or aligner_equals_peft or per_layer or official or inspect"],
    5: ["tests/test_train_generate.py"],
    6: ["tests/test_merge_inspect.py"],
    7: ["tests/test_dpo.py"],
}
PROPERTIES = [  # graders (lessons/graders.py) that catch what PROJECT_TESTS missed, run on the project
    "attention_in_bfloat16", "rope_scales_long_context", "kv_cache_keeps_every_column", "prefix_per_row",
    "prefix_in_bfloat16", "aligner_parameters", "aligner_prefix", "loss_with_padding", "loss_gradient",
    "accumulation_one_step", "merge_in_bfloat16", "sequence_logprob_sums_each_row", "dpo_equals_the_formula",
]


@pytest.mark.parametrize("grader", PROPERTIES)
def test_the_primer_has_the_property(grader):
    import graders

    graders.quiet()
    ok, detail = graders.grade(grader)
    assert ok, detail


def copy_project(to: Path) -> Path:
    """The project's files (not .venv, checkpoints, runs) in `to`/main, the shared folder beside it."""
    skip = shutil.ignore_patterns(".venv", ".git", "checkpoints", "runs", "__pycache__", ".pytest_cache", "*.png")
    shutil.copytree(ROOT, to / "main", ignore=skip)
    (to / "shared").symlink_to(ROOT.parent / "shared")
    return to / "main"


def caught(copy: Path, lesson: int, with_properties, project=True) -> bool:
    """Whether the project's tests of `lesson` (then, apart: -k selects, this file's properties) fail in `copy`."""
    for args in ([PROJECT_TESTS[lesson]] if project else []) + ([[HERE]] if with_properties else []):
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=copy,
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            return True
    return False


def run(lessons: list, with_properties: bool, keys=None, project=True) -> list:
    """[(mistake, caught?)] for every catalog entry of `lessons` (or those named in `keys`)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="aligner-project-catalog-") as tmp:
        copy = copy_project(Path(tmp))
        for m in MISTAKES:
            if m.lesson not in lessons or (keys and f"{m.lesson}: {m.name}" not in keys):
                continue
            path, start = copy / m.file, time.time()
            right = path.read_text()
            path.write_text(apply(right, m))
            try:
                out.append((m, caught(copy, m.lesson, with_properties, project)))
            finally:
                path.write_text(right)
            print(f"{'CAUGHT' if out[-1][1] else 'MISSED'}  {m.lesson}: {m.name} ({time.time() - start:.0f} s)",
                  flush=True)
    return out


def test_a_wrong_answer_in_the_primer_fails_the_projects_tests():
    """One entry the project's other tests missed (the full run above): this file's properties catch it."""
    [(_, hit)] = run([5], True, {"5: micro-batch loss not divided"}, project=False)
    assert hit


def main(argv: list):
    p = argparse.ArgumentParser(description="every catalog entry against the project's tests")
    p.add_argument("lessons", nargs="*", type=int, help="lesson numbers (default: all)")
    p.add_argument("--without-properties", action="store_true", help="leave this file's own tests out")
    p.add_argument("--only", action="append", default=[], help='one entry, "LESSON: NAME" (repeatable)')
    p.add_argument("--properties-only", action="store_true", help="run this file's properties alone")
    args = p.parse_args(argv)
    chosen = args.lessons or sorted(PROJECT_TESTS)
    results = run(chosen, not args.without_properties, set(args.only), not args.properties_only)
    for lesson in chosen:
        mine = [hit for m, hit in results if m.lesson == lesson]
        print(f"lesson {lesson}: {sum(mine)} of {len(mine)} caught")


if __name__ == "__main__":
    main(sys.argv[1:])
