"""How close two computations of the same quantity must be: a tolerance from the arithmetic, not
from what one machine printed. The tests and the lesson graders use it.

    from support.tolerance import assert_close, tolerance
    assert_close(ours, reference, terms=96, depth=5)    # 4 layers and the output projection

Two correct programs that compute the same real numbers in floating point may still add them in
another order: another matrix kernel (chosen by the CPU's vector width, the batch size, the thread
count), another library. A sum of n terms, in any order, lies within gamma_n * sum |x_i| of the
exact sum, gamma_n = n u / (1 - n u) ~ n u with u = eps / 2 the unit roundoff (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., section 4.2). Two orders thus differ by at most
n * eps * sum |x_i| to first order. A network repeats such sums: `depth` stages in sequence (a
layer, then the next), each reducing at most `terms` terms. Counting one such sum per stage and
assuming that a normalised layer does not amplify an incoming error (a model, not a proof: a layer
holds several sums in sequence, and attention can amplify), the tolerance is
depth * terms * eps * magnitude, with `magnitude` the size of the compared values (their largest
absolute value, unless the caller knows the summed terms are larger: cancellation). Transcendental
functions (exp in a softmax, the cosines of RoPE) differ between vector widths by a few ulps, well
inside the n ulps above.

The worst-case n per sum makes up for the model's gaps in practice: the largest difference measured
on the tests' models, under every kernel setting, is about 1% of it (docs/tests.md). It is loose for
the typical case (rounding errors add like a random walk, sqrt(n)) and still catches mistakes of the
code: a wrong scale, a missing term or a wrong position moves values by far more than the
tolerance, which `assert_close` states in its message. Exact comparisons (torch.equal) are for the
same kernels on the same inputs in the same order, and each says so where it is made.
Not run on its own. Read next: tests/conftest.py.
"""
import math

import torch


def tolerance(dtype: torch.dtype, magnitude: float, terms: int, depth: int = 1) -> float:
    """The largest difference that two correct computations of values of about `magnitude` may
    show: `depth` stages in sequence, each summing at most `terms` terms in another order."""
    if terms < 1 or depth < 1:
        raise ValueError(f"terms and depth count sums: at least 1 each, got {terms} and {depth}")
    return depth * terms * torch.finfo(dtype).eps * magnitude


def difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference, measured in float64 (so that measuring adds no rounding)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} against {tuple(expected.shape)}")
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def check_close(actual, expected, *, terms: int, depth: int = 1, magnitude: float = None,
                dtype: torch.dtype = None):
    """(within the tolerance?, a one-line account: the difference, the tolerance and what sets it)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    dtype = dtype or (actual.dtype if actual.is_floating_point() else torch.float32)
    size = magnitude
    if size is None:
        size = expected.double().abs().max().item() if expected.numel() else 0.0
    tol = tolerance(dtype, size, terms, depth)
    d = difference(actual, expected)
    share = f", {tol / size:.1e} of it" if size else ""
    account = (f"max |difference| {d:.3g}; tolerance {tol:.3g} = {depth} x {terms} x eps({dtype}) x "
               f"magnitude {size:.3g}{share}")
    return math.isfinite(d) and d <= tol, account


def assert_close(actual, expected, *, terms: int, depth: int = 1, magnitude: float = None,
                 dtype: torch.dtype = None, what: str = "values"):
    """Fail unless `actual` equals `expected` within `tolerance` (see check_close)."""
    ok, account = check_close(actual, expected, terms=terms, depth=depth, magnitude=magnitude, dtype=dtype)
    if not ok:
        raise AssertionError(f"{what}: {account}")


def logits_sums(args, positions: int) -> dict:
    """terms and depth for a model's logits (or its hidden states): every layer sums over the width,
    the feed-forward width and the attended positions; the output projection is one stage more."""
    return {"terms": max(args.dim, args.hidden_dim, positions), "depth": args.n_layers + 1}


def check_greedy(mine: list, theirs: list, next_logits, tol: float):
    """(do two greedy decodings agree?, an account). They agree token for token, or up to a step at
    which the reference's logits for the two choices lie within `tol` of each other: a near tie that
    rounding may break either way (what follows it differs, so the comparison ends there).
    `next_logits(prefix)` gives the reference's logits (vocab,) after the tokens `prefix`."""
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            logits = next_logits(list(mine[:i]))  # (vocab,)
            gap = abs(logits[a].item() - logits[b].item())
            return gap <= tol, (f"first difference at step {i}: token {a} against {b}, whose logits differ "
                                f"by {gap:.3g} (a near tie is within {tol:.3g})")
    return len(mine) == len(theirs), f"{len(mine)} tokens against {len(theirs)}"


def assert_same_greedy(mine: list, theirs: list, next_logits, tol: float, what: str = "greedy tokens"):
    ok, account = check_greedy(mine, theirs, next_logits, tol)
    if not ok:
        raise AssertionError(f"{what}: {account}")
