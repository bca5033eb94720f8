"""experiments/form_vs_knowledge.py: its scorers are strict (a hit names the right city and no other; a
letter needs a body), its knowledge probes never leak the held-out wordings into training, and --quick
runs end to end on the real embedded model: the grid, then the follow-up cells at the best learning
rates, every answer kept; a run killed mid-write resumes (the cut line dropped, only the missing cell
redone); a run of another knowledge task, or a smoke run over the committed results, is refused before
it writes anything. The report's intervals match published and independent values, and it checks the
cells against experiments/design.json (outside it, on a grid's edge, chosen from a partial grid)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from support.errors import UserError

sys.path[:0] = [str(ROOT / "experiments"), str(ROOT / "data")]
import form_vs_knowledge as experiment  # noqa: E402
from make_form_data import follows_form, letter, reuses_template  # noqa: E402


def run_quick(out, *flags):
    command = [sys.executable, "experiments/form_vs_knowledge.py", "--quick", "--out", str(out), *flags]
    # a bound against a hang, not a speed check: ~70 s quiet, and 2-thread cells slow down many times
    # over when other work holds the cores (OpenMP regions wait for both)
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_a_knowledge_hit_names_the_right_city_and_no_other():
    check = experiment.city_check
    assert check(" Kalo Miven lives in Lima.", "Lima") and check("LIMA", "Lima")
    assert not check(" The climate there is mild.", "Lima")  # a city inside another word
    assert not check(" Lima or Oslo.", "Lima") and not check(" Oslo.", "Lima") and not check("", "Lima")
    assert not check(" Limassol", "Lima")


def test_a_letter_needs_a_body_between_its_opening_and_closing():
    assert follows_form(letter("The sky is blue.")) and follows_form("  " + letter("Hi.") + "\n")
    assert not follows_form("Dear reader,\nYours, Aligner.")
    assert not follows_form("Dear reader,\n \nYours, Aligner.")
    assert not follows_form("Dear reader,\nHello.") and not follows_form("Hello.\nYours, Aligner.")


def test_held_out_prompts_are_split_by_template_reuse_and_nothing_held_out_is_trained_on(tmp_path):
    train = json.loads((ROOT / "data" / "form_train.json").read_text())
    held = json.loads((ROOT / "data" / "form_heldout.json").read_text())
    assert all(reuses_template(r["instruction"]) for r in train)  # the patterns cover every template
    assert sum(reuses_template(r["instruction"]) for r in held) == 24
    task = experiment.knowledge_task(16, False, tmp_path)
    trained = {r["instruction"] for r in task.records}
    assert {p.prompt for p in task.probes["recall"]} == trained and len(trained) == 64
    assert not trained & {p.prompt for p in task.probes["score"] + task.probes["val_score"]}
    assert len(task.probes["score"]) == 32 and len({p.answer for p in task.probes["score"]}) == 16
    assert experiment.chance(task) == {"score": 1 / 16, "recall": 1 / 16, "val_score": 1 / 16}


def test_claims_quick_and_resume(smollm2_dir, tmp_path):
    said = run_quick(tmp_path)
    assert "16 cells, 0 already in" in said and "25 cells, 16 already in" in said  # the grid, then the rest
    summary = json.loads((tmp_path / "results.json").read_text())
    params = {(g["task"], g["method"], g["n"]): g["params"] for g in summary["main"]}
    per_layer_lora = 2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)  # wq wk wv wo w1 w2 w3
    qv = 576 + 576 + 576 + 192  # rank 1 on wq (576 -> 576) and wv (576 -> 192)
    assert [params[("knowledge", m.kind, m.n)] for m in experiment.METHODS] == \
        [828, 6012, 57852, 161532, 30 * 8 * per_layer_lora, 30 * qv, 30 * 3 * qv]
    rows = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    check_rows(rows, tmp_path / "answers.jsonl")
    assert "| Aligner N=1 | 828 |" in (tmp_path / "results.md").read_text()
    assert all((tmp_path / png).stat().st_size > 0 for png in ("grid.png", "curves.png", "start_layer.png",
                                                                "gates.png"))
    check_repeat(tmp_path, rows)
    check_resume(tmp_path, rows)


def check_repeat(out: Path, rows: list):
    """repeat_cell.py trains a stored cell again: under the kernel and threads it ran with, every score
    equal (exit 0), its row recorded for the report's kernel check; a cell the file lacks, or a record
    file that is the experiment's own, is refused in one line (exit 2)."""
    row = next(r for r in rows if (r["task"], r["method"], r["n"]) == ("knowledge", "aligner", 10))
    assert row["attention"] == "einsum"
    flags = ["--out", str(out), "--task", "knowledge", "--method", "aligner", "--n", "10", "--lr",
             str(row["lr"]), "--seed", str(row["seed"]), "--steps", ",".join(map(str, row["checkpoints"])),
             "--threads", str(os.cpu_count() or 1)]
    r = subprocess.run([sys.executable, "experiments/repeat_cell.py", *flags, "--record",
                        str(out / "repeats.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "the cell repeats" in r.stdout, r.stdout + r.stderr[-2000:]
    recorded = json.loads((out / "repeats.jsonl").read_text())
    assert recorded["at"] == row["at"] and recorded["attention"] == "einsum"
    assert recorded["threads"] == (os.cpu_count() or 1)
    refused = [(["--seed", "7"], "has no cell"), (["--record", str(out / "cells.jsonl")], "cells.jsonl")]
    for bad, words in refused:
        r = subprocess.run([sys.executable, "experiments/repeat_cell.py", *flags, *bad], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def check_rows(rows: list, answers_file: Path):
    """Every cell has its answers, and they give back its scores; the curves and the sweep are there."""
    answers = {a["key"]: a["answers"] for a in map(json.loads, answers_file.read_text().splitlines())}
    assert len(rows) == 25 and all(experiment.key(r) in answers for r in rows)
    for row in rows:
        for point in row["at"]:
            kept = scores_of(answers[experiment.key(row)][str(point["step"])])
            assert kept == {name: point[name] for name in kept}
    curves = [r for r in rows if len(r["checkpoints"]) > 1]
    assert len(curves) == 7 and all([a["step"] for a in r["at"]] == [2, 4] for r in curves)
    sweep = [r for r in rows if (r["task"], r["method"], r["n"]) == ("form", "aligner", 1)]
    assert sorted(r["start"] for r in sweep) == [0, 2, 29]
    one = next(r for r in sweep if r["start"] == 2)
    assert len(one["gates"]) == len(one["bias_norms"]) == 28 and any(g != 0 for g in one["gates"][0])


def scores_of(answers: dict) -> dict:
    """{probe set: share of hits} from a checkpoint's kept [prompt, answer, hit] triples."""
    return {name: sum(hit for _, _, hit in said) / len(said) for name, said in answers.items()}


def check_resume(out: Path, rows: list):
    lines = (out / "cells.jsonl").read_text().splitlines()  # as if killed while writing the last cell
    (out / "cells.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    said = run_quick(out)
    assert "25 cells, 24 already in" in said and "16 cells, 16 already in" in said
    assert "## The kernel check" in (out / "results.md").read_text()  # the cell check_repeat recorded
    again = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert [r["at"] for r in again[:24]] == [r["at"] for r in rows[:24]] and len(again) == 25
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    r = subprocess.run([sys.executable, "experiments/form_vs_knowledge.py", "--quick", "--out", str(out),
                        "--people", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "another budget or task" in r.stderr and "Traceback" not in r.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing of the first run touched
    committed = ROOT / "experiments" / "results"
    before = {f.name: f.read_bytes() for f in committed.iterdir()}
    r = subprocess.run([sys.executable, "experiments/form_vs_knowledge.py", "--quick", "--out",
                        str(committed)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "another budget or task" in r.stderr
    assert {f.name: f.read_bytes() for f in committed.iterdir()} == before


def test_intervals_match_published_and_independent_values():
    from scipy.stats import binomtest

    import claims_report as report

    low, high = report.wilson(23, 32)  # Wilson's score interval, in closed form here
    z = 1.959964
    for bound in (low, high):  # each bound solves |p - bound| = z * sqrt(bound (1 - bound) / n)
        assert abs(abs(23 / 32 - bound) - z * (bound * (1 - bound) / 32) ** 0.5) < 1e-9
    assert report.wilson(0, 32)[0] == 0.0 and round(report.wilson(0, 32)[1], 4) == 0.1072
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10: 56/70 - 48/80
    assert [round(x, 4) for x in report.newcombe(56, 70, 48, 80)] == [0.0524, 0.3339]
    for wins, losses in ((16, 31), (20, 26), (26, 35), (27, 27)):
        assert abs(report.sign_test(wins, losses) - binomtest(wins, wins + losses).pvalue) < 1e-12


def test_the_report_checks_cells_against_the_design():
    cfg = experiment.ExperimentConfig(dtype="bfloat16")
    grid = experiment.lr_grid(cfg, "aligner")
    n1 = experiment.Method("aligner", 1)
    done = {}
    for lr, loss in ((grid[-1], 0.5), (grid[-2], 0.6)):  # two of five grid points: the best on an edge
        cell = experiment.make_cell(cfg, "form", n1, lr, 1, [cfg.form_steps])
        done[experiment.key(cell)] = dict(cell, at=[{"step": cfg.form_steps, "val_loss": loss}])
    stray = experiment.make_cell(cfg, "form", n1, 0.5, 1, [cfg.form_steps])  # an lr of no grid
    done[experiment.key(stray)] = dict(stray, at=[{"step": cfg.form_steps, "val_loss": 0.1}])
    lines = "\n".join(experiment.design_check(cfg, done, 30))
    assert "1 cells done are outside the design" in lines and '"lr": 0.5' in lines
    assert f"- form, aligner 1: on the edge of its grid ({grid[-1]:g}); chosen from 2 of the grid's 5" \
        in lines
    assert "- knowledge, aligner 1: no grid cell done" in lines
    assert experiment.best_lr(cfg, done, "form", n1) == grid[-1]  # the stray cell is never chosen
    experiment.check_budget(Path("out"), cfg, done, 30)  # a stray learning rate is listed, not refused
    other = experiment.make_cell(experiment.ExperimentConfig(dtype="bfloat16", people=8), "knowledge", n1,
                                 grid[0], 1, [cfg.knowledge_steps])
    with pytest.raises(UserError, match="another budget or task"):  # another task: refused
        experiment.check_budget(Path("out"), cfg, {**done, experiment.key(other): other}, 30)


def test_the_grid_table_of_a_grid_still_running():
    """A learning rate run on form and not yet on knowledge is a row with '-' for the missing cell (the
    report is rewritten while the grid runs), and each score sits under its own column."""
    import claims_report as report

    def row(task, lr, **at):
        return dict(task=task, method="aligner", n=1, start=2, seed=1, lr=lr, checkpoints=[40], at=[at])
    rows = [row("form", 0.01, val_loss=0.7, score=0.25), row("form", 0.1, val_loss=3.9, score=0.0),
            row("knowledge", 0.01, val_loss=0.5, val_score=0.125, score=0.0625, recall=0.5)]
    best = [dict(task=t, method="aligner", n=1, lr=0.01) for t in ("form", "knowledge")]
    lines = report.grid_table(report.Results(rows, best))
    assert lines[2:] == ["| Aligner N=1 | 0.01 | **0.700** | 25.0% | **0.500** | 12.5% | 6.2% | 50.0% |",
                         "| Aligner N=1 | 0.1 | 3.900 | 0.0% | - | - | - | - |"]


def test_the_other_rules_curves_and_the_kernel_check():
    """The curves at the validation accuracy's learning rate sit beside the loss rule's, hits pooled over
    seeds and the difference signed accuracy - loss; the kernel check puts a cell trained again in place
    of the design's (seed 1 only) and pools the new draw with the other seeds."""
    import claims_report as report

    def curve(m, n, lr, seed, held, kernel="einsum"):  # held: hits of 32 at steps 50 and 400
        at = [{"step": s, "score": h / 32, "recall": 1.0, "val_loss": 0.1} for s, h in zip((50, 400), held)]
        return dict(task="knowledge", method=m, n=n, start=2, seed=seed, lr=lr, checkpoints=[50, 400], at=at,
                    attention=kernel)
    rows = [curve("lora-qv", 1, 0.003, s, (10, 20)) for s in (1, 2)]
    rows += [curve("lora-qv", 1, 0.01, s, (30, 32)) for s in (1, 2)]
    rows += [curve("aligner", 10, 0.03, 1, (1, 23), "sdpa"), curve("aligner", 10, 0.03, 2, (2, 19))]
    best = [dict(task="knowledge", method=m, n=n, lr=lr) for m, n, lr in (("lora-qv", 1, 0.003),
                                                                           ("aligner", 10, 0.03))]
    res, sizes = report.Results(rows, best), {"knowledge": {"score": 32, "recall": 64}}
    low, high = report.newcombe(64, 64, 40, 64)
    assert report.rule_table(res, sizes)[2:] == [
        f"| LoRA r=1 (wq, wv) | 2 -> 2 | 0.003 -> 0.01 | 50: 20 -> 60, 400: 40 -> 64 (of 64 -> 64) | +37.5 "
        f"[{100 * low:+.1f}, {100 * high:+.1f}] |"]
    again = dict(curve("aligner", 10, 0.03, 1, (3, 9)), threads=1)
    lines = report.kernel_check(res, [again], sizes, best)
    assert "| Aligner N=10, knowledge, lr 0.03, seed 1 | sdpa -> einsum | 1 -> 3 / 64 -> 64 | 23 -> 9 / " \
           "64 -> 64 |" in lines
    assert "| Aligner N=10 | 0.03 | 2 | 28/64 = 43.8% [32.3, 55.9] | 128/128 = 100.0% [97.1, 100.0] |" in lines
    assert report.kernel_check(res, [], sizes, best) == []
