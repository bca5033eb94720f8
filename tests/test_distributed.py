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
from support.checkpoint import load_model
from support.tolerance import assert_close, logits_sums


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
    """The same steps on the same batches; two processes sum the gradients of their micro-batches
    in another order (and, sharded, gather the weights), so the losses and the Aligner agree within
    the rounding of those sums: the forward and backward through every layer, then AdamW's steps
    (each moves a number by at most about the lr, so the Aligner's rounding scales with steps x lr)."""
    _, path = tiny
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    common = ["--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "1", "--eval-every", "2",
              "--val-fraction", "0.2"]
    run(1, train_args(path, tmp_path / "d.json", tmp_path / "one.pt", *common))
    extra = ["--shard"] if mode == "shard" else []
    run(2, train_args(path, tmp_path / "d.json", tmp_path / "two.pt", *common, *extra))
    one, two = losses(tmp_path / "one.metrics.jsonl"), losses(tmp_path / "two.metrics.jsonl")
    args = load_model(path).args
    sums = logits_sums(args, 4 * 64)  # a step's sums run over its 4 micro-batches' positions
    assert len(one) == len(two) == 4
    assert_close(torch.tensor(one), torch.tensor(two), terms=max(sums["terms"], args.vocab_size),
                 depth=sums["depth"] + 1, what="losses")
    a, b = load_aligner(tmp_path / "one.pt"), load_aligner(tmp_path / "two.pt")
    lr = 9e-3  # train.py's default
    for name in ("tokens", "gates"):
        assert_close(getattr(b, name), getattr(a, name), terms=sums["terms"], depth=2 * sums["depth"],
                     magnitude=4 * lr, what=f"the Aligner's {name} after 4 AdamW steps")
    assert b.gates.abs().sum() > 0
