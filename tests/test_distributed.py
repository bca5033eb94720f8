"""torchrun: 2 processes (gloo, CPU) give the same losses and adapter as 1 process, for the
data-parallel mode and for --shard (FSDP2), with the same seed and global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_train_generate import RECORDS, losses, train_args

from support.adapter_file import load_aligner


def run(n_procs, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_procs),
           "train.py", *args]
    if n_procs == 1:
        cmd = [sys.executable, "train.py", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("mode", ["data-parallel", "shard"])
def test_two_processes_equal_one(tiny, tmp_path, mode):
    _, path = tiny
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    common = ["--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "1", "--eval-every", "2",
              "--val-fraction", "0.2"]
    run(1, train_args(path, tmp_path / "d.json", tmp_path / "one.pt", *common))
    extra = ["--shard"] if mode == "shard" else []
    run(2, train_args(path, tmp_path / "d.json", tmp_path / "two.pt", *common, *extra))
    one, two = losses(tmp_path / "one.metrics.jsonl"), losses(tmp_path / "two.metrics.jsonl")
    assert len(one) == len(two) == 4 and one == pytest.approx(two, abs=1e-5)
    a, b = load_aligner(tmp_path / "one.pt"), load_aligner(tmp_path / "two.pt")
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.gates, b.gates, atol=1e-5, rtol=0)
    assert b.gates.abs().sum() > 0
