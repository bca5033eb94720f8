"""bench.py runs (a smoke test: the figures themselves are for the README, not for asserting)."""
from test_model import run_cli


def test_bench_runs_on_the_tiny_size():
    r = run_cli("bench.py", "--device", "cpu", "--size", "tiny", "--rounds", "1", "--steps", "1",
                "--new-tokens", "4", "--batch", "2", "--seq", "16", "--gen-batch", "4")
    assert r.returncode == 0, r.stderr
    assert "summary: train x" in r.stdout and "generate x" in r.stdout
