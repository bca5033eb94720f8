"""How fast one decoding step's matrix products can read their weights on this CPU, kernel by kernel.

    python benchmarks/linear_kernels.py            # SmolLM2-135M's shapes, float32, torch's thread count
    python benchmarks/linear_kernels.py --dtype bfloat16 --threads 1

At batch 1 a decoding step is a product of one row with each weight matrix (x (1, D) @ W^T), so its
speed is the rate at which the weights stream in from memory. For each weight shape of the model
(wq/wo, wk/wv, w1/w3, w2, the output projection) this times, on enough copies of the matrix that
they do not stay in cache (as a step's 540 MB do not): F.linear (what nn.Linear, model.py and
transformers all run), the same product from a weight stored transposed, and oneDNN's float32 linear
(what support/quantize.py's OneDNNLinear runs for decoding) on the weight itself. It prints GB/s of
weights read, median of --rounds. docs/performance.md says what the figures meant for generate.py.
Read next: docs/performance.md.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import CONFIGS  # noqa: E402


def shapes(size: str) -> dict:
    """The (out, in) shape of each kind of weight of one model size."""
    a = CONFIGS[size]
    kv = a.n_kv_heads * a.head_dim
    return {"wq, wo": (a.dim, a.dim), "wk, wv": (kv, a.dim), "w1, w3": (a.hidden_dim, a.dim),
            "w2": (a.dim, a.hidden_dim), "output": (a.vocab_size, a.dim)}


def rate(products: list, n_bytes: int, rounds: int) -> float:
    """GB/s of weights read by one pass over every product in `products`, the median over rounds."""
    for p in products:  # warm-up: first touch, primitive creation
        p()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for p in products:
            p()
        times.append(time.perf_counter() - start)
    return n_bytes * len(products) / statistics.median(times) / 1e9


def kernels(out_dim: int, in_dim: int, copies: int, dtype) -> dict:
    """name -> the list of products (one per copy of the weight), each kernel on the same weights."""
    x = torch.randn(1, 1, in_dim, dtype=dtype)  # (1, 1, in): one token
    weights = [torch.randn(out_dim, in_dim).to(dtype) for _ in range(copies)]  # (out, in) each
    transposed = [w.t().contiguous() for w in weights]  # (in, out) each
    return {"F.linear": [lambda w=w: F.linear(x, w) for w in weights],
            "x @ W^T stored": [lambda w=w: x @ w for w in transposed],
            "oneDNN linear": [lambda w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
                              for w in weights]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="smollm2-135m", choices=sorted(CONFIGS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cold-mb", type=float, default=256, help="weights cycled per shape, MB (beyond cache)")
    cfg = p.parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    print(f"{cfg.size}, {cfg.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"GB/s of weights")
    print(f"{'weight':>8} {'shape':>13} " + " ".join(f"{k:>15}" for k in ("F.linear", "x @ W^T stored",
                                                                         "oneDNN linear")))
    for name, (o, i) in shapes(cfg.size).items():
        n_bytes = o * i * dtype.itemsize
        copies = max(2, int(cfg.cold_mb * 1e6 / n_bytes))
        rates = {k: rate(ps, n_bytes, cfg.rounds) for k, ps in kernels(o, i, copies, dtype).items()}
        print(f"{name:>8} {str((o, i)):>13} " + " ".join(f"{r:15.1f}" for r in rates.values()), flush=True)


if __name__ == "__main__":
    main()
