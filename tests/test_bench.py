"""bench.py runs and compares like with like (the figures themselves are for docs/performance.md, not
for asserting): each dtype's peers are built in that dtype, from our model's weights.

Run: .venv/bin/python -m pytest -q tests/test_bench.py
Read next: tests/test_dtype_rule.py.
"""
import bench


def test_bench_runs_each_dtype_against_peers_in_that_dtype(monkeypatch, capsys):
    built, real = [], bench.peer_model

    def peer_model(model, n_tokens, device, dtype):
        hf, peft = real(model, n_tokens, device, dtype)
        built.append((model.output.weight.dtype, hf.lm_head.weight.dtype))
        return hf, peft

    monkeypatch.setattr(bench, "peer_model", peer_model)
    bench.main(["--device", "cpu", "--size", "tiny", "--rounds", "1", "--steps", "1", "--new-tokens", "4",
                "--batch", "2", "--seq", "16", "--gen-batch", "4", "--dtype", "both"])
    out = capsys.readouterr().out
    assert [str(a)[6:] + "/" + str(b)[6:] for a, b in built] == ["float32/float32", "bfloat16/bfloat16"]
    assert out.startswith("CPU: ") and "bfloat16 units on cpu: " in out.splitlines()[0]
    for dtype in ("float32", "bfloat16"):
        assert f"summary {dtype}: train x" in out and f"transformers, no adapter, {dtype}" in out
    assert "ours bfloat16 vs ours float32: train x" in out
