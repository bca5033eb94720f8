"""A 7B or 13B Aligner on a small GPU: the frozen base's layers in 8 or 4 bits (torchao), checked on
a tiny model written by transformers: really quantized (bytes measured), still close to the
unquantized model, trainable through, and the adapter independent of the base's precision."""
import json

import pytest
import torch
from conftest import make_model_dir
from test_model import nonzero_aligner, tokens
from test_train_generate import RECORDS

import train
from support.adapter_file import load_aligner
from support.checkpoint import load_model
from support.quantize import storage_bytes

torchao = pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def model_256(tmp_path_factory):
    """dim 256, so that every layer weight splits into NF4's blocks of 64."""
    return make_model_dir(tmp_path_factory.mktemp("q"), dim=256, layers=3)[1]


def layer_bytes(model):
    return sum(storage_bytes(p) for layer in model.layers for p in layer.parameters() if p.dim() == 2)


@pytest.fixture(scope="module")
def smollm2_full(smollm2_dir):
    return load_model(smollm2_dir)


@pytest.mark.parametrize("mode,most,agree", [("int8", 0.55, 0.99), ("nf4", 0.35, 0.50)])
def test_quantized_is_smaller_and_close(smollm2_dir, smollm2_full, mode, most, agree):
    """On the real embedded model (a random tiny model's logits are near-ties that any noise flips):
    next-token agreement on a fixed batch of real text (64 positions), with a non-zero Aligner. int8
    keeps 99% of these; on 2,048 positions of text about 96% (benchmarks/quant_agreement.py).
    NF4 moves each weight by about 9% (RMS; intrinsic to 16 levels, checked below), and on a
    135M-parameter model that flips a third of the greedy choices on natural text (measured 61-73%),
    so the bound for NF4 is 50%, far above a broken quantization's near 0%."""
    from support.tokenizer import Tokenizer

    full = smollm2_full
    bf16 = sum(p.numel() * 2 for layer in full.layers for p in layer.parameters() if p.dim() == 2)
    quantized = load_model(smollm2_dir, quantize=mode)
    assert layer_bytes(quantized) <= most * bf16, (layer_bytes(quantized), bf16)
    tok = Tokenizer(smollm2_dir)
    texts = ["The capital of France is Paris, and the capital of Italy is Rome. Both cities are old.",
             "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
             "Below is an instruction that describes a task. Write a response that appropriately completes it.",
             "Water boils at 100 degrees Celsius at sea level, and freezes at zero degrees Celsius."]
    x = torch.tensor([tok.encode(t)[:16] for t in texts])  # (4, 16)
    aligner = nonzero_aligner(full.args, 1)
    with torch.no_grad():
        aligner.gates.mul_(0.1)
        ref, got = full(x, aligner), quantized(x, aligner)  # (4, 16, vocab)
    assert (ref - got).abs().max() > 1e-3  # really quantized, not a copy of the full model
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= agree
    w, q = full.layers[5].attention.wq.weight, quantized.layers[5].attention.wq.weight
    error = ((q.to(w.dtype) if mode == "nf4" else q.dequantize()) - w).norm() / w.norm()
    assert 0 < error < {"int8": 0.01, "nf4": 0.12}[mode]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_training_on_a_quantized_base(model_256, tmp_path, mode):
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    out = tmp_path / "q.pt"
    before = {k: v.clone() for k, v in load_model(model_256).state_dict().items()}
    train.main(["--model", str(model_256), "--data", str(tmp_path / "d.json"), "--out", str(out), "--quantize", mode,
                "--max-steps", "10", "--lr", "3e-2", "--warmup-steps", "1", "--batch-size", "4",
                "--micro-batch-size", "4", "--eval-every", "0", "--quiet", "--device", "cpu"])
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "q.metrics.jsonl").read_text().splitlines())]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    a = load_aligner(out)
    assert a.meta["quantize"] == mode and a.gates.abs().sum() > 0
    full = load_model(model_256)  # the unquantized base: the adapter loads and runs on it unchanged
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())  # exact: never written
    a.check_fits(full.args)
    with torch.no_grad():
        assert torch.isfinite(full(tokens(1, 5), a)).all()
