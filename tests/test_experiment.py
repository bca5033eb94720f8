"""experiments/form_vs_knowledge.py --quick runs end to end on the real embedded model, and a run killed
mid-write resumes: the cut line is dropped and only the missing cell is redone; a run of another
knowledge task, or a smoke run over the committed results, is refused before it writes anything."""
import json
import subprocess
import sys

from conftest import ROOT


def run_quick(out, *flags):
    command = [sys.executable, "experiments/form_vs_knowledge.py", "--quick", "--out", str(out), *flags]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_claims_quick_and_resume(smollm2_dir, tmp_path):
    assert "14 cells, 0 already in" in run_quick(tmp_path)
    groups = json.loads((tmp_path / "results.json").read_text())["groups"]
    params = {(g["task"], g["method"], g["n"], g["start"]): g["params"] for g in groups}
    assert [params[("knowledge", m, n, 2)] for m, n in [("base", 0), ("aligner", 1), ("aligner", 10),
                                                          ("aligner", 100), ("per-layer", 10), ("lora", 8)]] \
        == [0, 828, 6012, 57852, 161532, 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))]
    assert sorted(s for (t, m, n, s) in params if m == "aligner" and n == 1 and t == "form") == [0, 2, 29]
    rows = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and all(0 <= r["score"] <= 1 for r in rows)
    one = next(r for r in rows if (r["task"], r["method"], r["n"], r["start"]) == ("form", "aligner", 1, 2))
    assert len(one["gates"]) == len(one["bias_norms"]) == 28 and any(g != 0 for g in one["gates"][0])
    assert "| Aligner N=1 | 828 |" in (tmp_path / "results.md").read_text()
    assert all((tmp_path / png).stat().st_size > 0 for png in ("grid.png", "start_layer.png", "gates.png"))

    lines = (tmp_path / "cells.jsonl").read_text().splitlines()  # as if killed while writing the last cell
    (tmp_path / "cells.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    assert "14 cells, 13 already in" in run_quick(tmp_path)
    again = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    assert [r["score"] for r in again[:13]] == [r["score"] for r in rows[:13]] and len(again) == 14
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    r = subprocess.run([sys.executable, "experiments/form_vs_knowledge.py", "--quick", "--out", str(tmp_path),
                        "--people", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "another budget or task" in r.stderr and "Traceback" not in r.stderr
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # nothing of the first run touched
    committed = ROOT / "experiments" / "results"
    before = {f.name: f.read_bytes() for f in committed.iterdir()}
    r = subprocess.run([sys.executable, "experiments/form_vs_knowledge.py", "--quick", "--out",
                        str(committed)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "another budget or task" in r.stderr
    assert {f.name: f.read_bytes() for f in committed.iterdir()} == before
