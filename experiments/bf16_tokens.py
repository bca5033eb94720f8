"""The bfloat16-parameter control of docs/claims.md's embedding analysis: train.py's own set-up and step,
but with the Aligner's tokens and gates themselves kept in bfloat16 (no float32 copy), as the official
code trains them, so that an Adam step smaller than half a number's bfloat16 spacing is lost.

    python experiments/bf16_tokens.py --data runs/embed/knowledge_train.json --template raw \\
        --tokens 10 --seed 1 --lr 1e-2 --max-steps 100 --out runs/embed/bf16p_know.pt

Every flag is train.py's (the base runs in bfloat16 here); compare the file with `adapter.py compare`.
Read next: docs/claims.md ("The embeddings: how many numbers are the same").
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from support.adapter_file import save_aligner  # noqa: E402
from support.errors import run_main  # noqa: E402
from support.flags import Runtime, parse_flags  # noqa: E402
from support.outputs import check_output_file  # noqa: E402
from train import TrainConfig, setup, train_step  # noqa: E402


def bf16_run(cfg: TrainConfig):
    out, cfg.out = cfg.out, None  # this script writes the adapter itself, once, at the end
    check_output_file(out, [cfg.data])  # before any work
    run = setup(cfg, Runtime(device="cpu", dtype="bfloat16"))
    run.aligner.to(torch.bfloat16)  # the trained tensors themselves in bfloat16, as the official code's
    run.optimizer = torch.optim.AdamW(run.aligner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=(0.9, 0.95))
    while run.step < run.total:
        loss = train_step(run, cfg)[0]
    save_aligner(run.aligner, out)
    print(f"wrote {out} after {run.step} steps (last loss {loss:.4f}); tokens {run.aligner.tokens.dtype}")


if __name__ == "__main__":
    run_main(lambda: bf16_run(parse_flags(None, __doc__, TrainConfig)[0]))
