"""The tolerance itself checked, both ways (support/tolerance.py): it holds for correct computations
that only sum in another order, and the main parity comparisons still fail for the small mistakes a
student or a refactoring makes. The sizes printed in the failures are those docs/tests.md quotes."""
import pytest
import torch
from conftest import make_model_dir
from test_model import nonzero_aligner, peft_model, tokens

from support.checkpoint import load_model
from support.tolerance import assert_close, assert_same_greedy, check_close, logits_sums, tolerance


@pytest.mark.numeric
@pytest.mark.parametrize("n", [10, 1000, 100000])
def test_a_reordered_sum_is_within_the_bound(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)  # float32
    forward, backward = x.sum(), x.flip(0).cumsum(0)[-1]  # two orders of the same sum
    pairwise = x.view(-1, 10).sum(1).sum()  # blocks of ten, as a vectorised kernel adds
    magnitude = x.abs().sum().item()  # the summed terms' size (the sum itself cancels)
    for other in (backward, pairwise):
        assert_close(other, forward, terms=n, magnitude=magnitude)
    assert abs(forward.item() - x.double().sum().item()) <= tolerance(torch.float32, magnitude, n)


@pytest.mark.parametrize("n", [10, 1000])
def test_a_missing_term_of_typical_size_is_caught(n):
    """Dropping the median-sized term moves a sum of 10 or 1,000 normal terms past the bound (at
    100,000 terms the worst-case bound, n eps sum|x|, exceeds any single term: it cannot see one)."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))  # float32
    median = x.abs().argsort()[n // 2]
    ok, account = check_close(x.sum() - x[median], x.sum(), terms=n, magnitude=x.abs().sum().item())
    assert not ok, account


def test_greedy_agreement_allows_a_near_tie_and_nothing_else():
    logits = torch.tensor([0.0, 2.0, 2.0 + 1e-6, -1.0])  # tokens 1 and 2 tie within rounding

    def next_logits(done):
        return logits

    assert_same_greedy([2, 0], [1, 3], next_logits, tol=1e-5)  # a tie: either is right, what follows differs
    with pytest.raises(AssertionError, match="first difference at step 0"):
        assert_same_greedy([0, 1], [1, 1], next_logits, tol=1e-5)  # a clear margin: one of them is wrong
    with pytest.raises(AssertionError, match="tokens"):
        assert_same_greedy([1, 1], [1], next_logits, tol=1e-5)


def perturbed(model, how: str, size: float):
    """The model with one plausible mistake of relative size `size` (model.py's own modules touched
    in place, weights or settings, never the reference)."""
    layer = model.layers[1]
    with torch.no_grad():
        if how == "norm weight":  # a scale on one layer's attention norm
            layer.attention_norm.weight.mul_(1 + size)
        elif how == "norm eps":  # RMSNorm's epsilon off
            layer.attention_norm.eps *= 1 + size
        elif how == "rope theta":  # the RoPE base off (LLaMA-2: 10000; others other values)
            model.args.rope_theta *= 1 + size
        elif how == "residual":  # a scaled residual branch
            layer.attention.wo.weight.mul_(1 + size)
    return model


@pytest.mark.numeric
@pytest.mark.parametrize("how, size", [("norm weight", 1e-3), ("residual", 1e-3), ("rope theta", 3e-3),
                                       ("norm eps", 9.0)])
def test_the_logits_comparison_catches_small_mistakes(tmp_path, how, size):
    """A 0.1% scale on one layer's norm or output projection, a RoPE base 0.3% off, an RMSNorm epsilon
    ten times too large: each moves the logits past the tolerance of test_model's parity tests
    (5.7e-5 of the logits' size on the tiny model). Smaller slips sit at or below it and may pass: a
    RoPE base 0.1% off (caught one way, not the other), an epsilon of 2e-5 for 1e-5."""
    hf, path = make_model_dir(tmp_path)
    x = tokens()
    with torch.no_grad():
        want = hf(x).logits  # (B, T, vocab)
        ours = load_model(path)
        sums = logits_sums(ours.args, x.shape[1])
        assert check_close(ours(x), want, **sums)[0]  # the right model passes
        ok, account = check_close(perturbed(ours, how, size)(x), want, **sums)
    assert not ok, f"{how} off by {size:g} passes: {account}"


@pytest.mark.numeric
@pytest.mark.parametrize("gate_error", [1e-3, -1e-3])
def test_the_peft_comparison_catches_a_gate_off_by_a_thousandth(tmp_path, gate_error):
    hf, path = make_model_dir(tmp_path)
    ours = load_model(path)
    aligner = nonzero_aligner(ours.args, 2)
    x = tokens()
    pm, adapted = peft_model(hf, 2, n_adapted=2)
    for layer, mod in adapted.items():
        mod.adaption_prompt = torch.nn.Parameter(aligner.tokens.detach()[None].clone())  # (1, N, D)
        mod.adaption_gate = torch.nn.Parameter(aligner.gates.detach()[layer - 2].view(1, -1, 1, 1).clone())
    with torch.no_grad():
        want = pm(input_ids=x).logits  # (B, T, vocab)
        sums = logits_sums(ours.args, x.shape[1] + 2)
        assert check_close(ours(x, aligner), want, **sums)[0]
        aligner.gates.mul_(1 + gate_error)
        ok, account = check_close(ours(x, aligner), want, **sums)
    assert not ok, f"gates off by {gate_error:g} pass: {account}"
