"""experiments/reasoning_kept.py end to end on the tests' tiny model (--quick: one seed, 2 steps, 4
documents a task): the base, the demo's one-token Aligner, N=10 and the merged LoRA are trained and
scored through evaluate.py's lm-eval model, the JSON and the tables are written, and a second run
skips every (method, seed) already done. The merged LoRA directory holds the base's weights plus the
trained update (kept with --keep-models). In-process (lm-eval imported once): about a minute.

Run: .venv/bin/python -m pytest -q tests/test_reasoning_kept.py"""
import json
import os
import sys

import pytest
from conftest import ROOT

pytest.importorskip("lm_eval")
sys.path.insert(0, str(ROOT / "experiments"))
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_quick_run_on_the_tiny_model_writes_every_method_and_resumes(tiny, tmp_path, capsys):
    import reasoning_kept

    from support.checkpoint import read_state

    _, path = tiny
    out = tmp_path / "out"
    argv = ["--quick", "--model", str(path), "--out", str(out), "--keep-models"]
    reasoning_kept.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == ["aligner-10", "base", "demo-1", "lora-8"]
    for method, seeds in results["runs"].items():
        assert list(seeds) == (["0"] if method == "base" else ["1"])
        for label in ("mc acc", "arith strict", "arith flexible"):
            row = next(iter(seeds.values()))[label]
            assert row["n"] == 4 and 0 <= row["hits"] <= 4
            assert row["accuracy"] == pytest.approx(row["hits"] / 4)
    table = (out / "results.md").read_text()
    assert "| LoRA r=8, merged (lr 0.001, 40 steps) | 1 |" in table and "Newcombe" in table
    _, base = read_state(path)
    _, merged = read_state(out / "models" / "lora-8-seed1")
    assert merged["layers.0.attention.wq.weight"].ne(base["layers.0.attention.wq.weight"].float()).any()
    assert merged["layers.0.attention_norm.weight"].equal(base["layers.0.attention_norm.weight"].float())
    capsys.readouterr()
    reasoning_kept.main(argv)  # again: every (method, seed) is in results.json
    assert capsys.readouterr().out.count("in results.json already, skipped") == 4


def test_the_merged_lora_gives_the_wrapped_models_logits(tiny, tmp_path):
    """merge_lora writes W + scale * B @ A: the merged directory's logits equal those of the model with
    the LoRA wrappers the experiment trains (non-zero B on every projection), within float32 rounding;
    a merge that drops the scale, or transposes the update, is far off."""
    import torch

    import form_vs_knowledge as fvk
    import reasoning_kept

    from support.checkpoint import load_model
    from support.tolerance import assert_close, logits_sums

    _, path = tiny
    model = load_model(path)
    torch.manual_seed(3)
    for p in fvk.add_lora(model, "lora", 2):
        p.data = torch.randn_like(p) * 0.05  # B no longer zero: the update is real
    ids = torch.randint(0, model.args.vocab_size, (2, 12))  # (B, T)
    with torch.no_grad():
        wrapped = model(ids)  # (B, T, vocab)
        merged = load_model(reasoning_kept.merge_lora(model, path, tmp_path / "merged"))(ids)  # (B, T, vocab)
        base = load_model(path)(ids)  # (B, T, vocab)
    assert (wrapped - base).abs().max() > 1e-2  # the LoRA moves the logits
    assert_close(merged, wrapped, **logits_sums(model.args, ids.shape[1]), what="merged LoRA logits")
