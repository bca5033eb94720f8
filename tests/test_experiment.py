"""experiments/form_vs_knowledge.py --quick runs end to end on the real embedded model (smoke test)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_form_vs_knowledge_quick(smollm2_dir, tmp_path):
    r = subprocess.run([sys.executable, "experiments/form_vs_knowledge.py", "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["params"] for row in rows] == [0, 828, 6012, 57852, 161532, 460800]
    assert "| Aligner N=1 | 828 |" in (tmp_path / "results.md").read_text()
