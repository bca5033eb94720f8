"""Today's LLaMA family, converted from the Hugging Face layout and checked against transformers:
LLaMA-3.1's "llama3" RoPE scaling (positions well past the original context, head widths with
frequencies in all three bands), Qwen2's biases on q, k and v, Mistral; logits within 1e-5, greedy
decoding with the KV cache equal to transformers' generate, and an Aligner with non-zero gates that
trains for a few steps and changes nothing but itself. Other scaling kinds are refused."""
import json

import pytest
import torch
from conftest import make_tokenizer_json
from test_model import nonzero_aligner

from convert_weights import convert
from generate import Sampling, generate
from support.checkpoint import load_model
from support.errors import UserError
from support.tolerance import assert_close, assert_same_greedy, logits_sums, tolerance
from train import sft_loss

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}


def family(kind: str):
    """A random transformers model of the family (head width 16 with theta 10000: wavelengths 6.3,
    19.9 and 62.8 positions for the first pairs, one in each band of the llama3 scaling at 32)."""
    import transformers

    sizes = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False)
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**sizes, rope_scaling=SCALING, rope_theta=10000.0)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**sizes), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(**sizes, sliding_window=None), transformers.MistralForCausalLM
    torch.manual_seed(0)
    m = cls(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.08)
    return m


@pytest.fixture(scope="module", params=["llama3", "qwen2", "mistral"])
def converted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = family(request.param)
    hf.save_pretrained(folder / "hf")
    make_tokenizer_json(folder / "hf")
    return request.param, hf, load_model(convert(str(folder / "hf"), folder / "ours"))


@pytest.mark.numeric
def test_logits_equal_transformers_well_past_the_original_context(converted):
    kind, hf, ours = converted
    assert (ours.args.rope_factor == 8.0) == (kind == "llama3") and ours.args.qkv_bias == (kind == "qwen2")
    ids = torch.randint(3, 320, (2, 200), generator=torch.Generator().manual_seed(1))  # (B, T), T > 32 * 6
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, **logits_sums(ours.args, ids.shape[1]), what="logits")


@pytest.mark.numeric
def test_greedy_decoding_with_the_cache_equals_transformers(converted):
    _, hf, ours = converted
    prompt = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    mine = list(generate(ours, prompt, None, Sampling(max_new_tokens=12, temperature=0)))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 40:].tolist()
        magnitude = hf(torch.tensor([prompt])).logits.abs().max().item()
    tol = tolerance(torch.float32, magnitude, **logits_sums(ours.args, 52))
    with torch.no_grad():
        assert_same_greedy(mine, theirs, lambda done: hf(torch.tensor([prompt + done])).logits[0, -1], tol)


def test_an_aligner_trains_and_only_it_changes(converted):
    from data import IGNORE, Batch

    _, _, ours = converted
    a = nonzero_aligner(ours.args, 2)
    ids = torch.randint(3, 320, (4, 48), generator=torch.Generator().manual_seed(3))  # (B, T)
    labels = ids.clone()  # (B, T)
    labels[:, :24] = IGNORE
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    optimizer = torch.optim.AdamW(a.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        loss, _ = sft_loss(ours, a, Batch(ids, labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # exact: the frozen base is never written
    assert losses[-1] < losses[0] and all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


@pytest.mark.numeric
def test_the_hugging_face_export_computes_the_same(converted):
    """hf_layout and hf_state (adapter.py merge --format hf) write a LlamaForCausalLM: Qwen2's q/k biases
    permuted like their rows, the llama3 scaling in its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert_weights import hf_layout
    from support.hf import hf_state

    _, hf, ours = converted
    state, config = hf_state(ours.args, hf_layout(ours.args, ours.state_dict()))
    for key in ("architectures", "model_type", "torch_dtype"):
        config.pop(key)
    exported = LlamaForCausalLM(LlamaConfig(**config)).eval()
    exported.load_state_dict(state)
    ids = torch.randint(3, 320, (1, 120), generator=torch.Generator().manual_seed(4))  # (1, T)
    with torch.no_grad():
        assert_close(exported(ids).logits, hf(ids).logits, **logits_sums(ours.args, ids.shape[1]), what="logits")


@pytest.mark.parametrize("scaling, words", [({"rope_type": "yarn", "factor": 4.0}, "'yarn'"),
                                            ({"type": "linear", "factor": 2.0}, "'linear'"),
                                            ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
                                            ({"rope_type": "llama3", "factor": 8.0}, "lacks")])
def test_other_scalings_are_refused(tmp_path, scaling, words):
    family("llama3").save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "rope_scaling": scaling}))
    with pytest.raises(UserError, match=words):
        convert(str(tmp_path / "hf"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_metas_scaled_rope_flag_reads_as_the_llama3_scaling():
    """Meta's params.json says only `use_scaled_rope`; its reference code's values are taken."""
    from support.meta import meta_scaling

    assert meta_scaling({"dim": 64}) == {}
    assert meta_scaling({"use_scaled_rope": True}) == {"rope_factor": 8.0, "rope_low_freq_factor": 1.0,
                                                       "rope_high_freq_factor": 4.0, "rope_original_context": 8192}
    assert meta_scaling({"use_scaled_rope": True, "rope_scaling_factor": 32.0})["rope_factor"] == 32.0


def test_a_sliding_window_shorter_than_the_run_is_refused(tmp_path):
    """Mistral with sliding_window 64 < 256 positions: the converted context is the window (exact
    there), and a training run asking for longer sequences is one line, exit 2, nothing written."""
    import subprocess
    import sys

    from conftest import ROOT

    hf = family("mistral")
    hf.config.sliding_window = 64
    hf.save_pretrained(tmp_path / "hf")
    make_tokenizer_json(tmp_path / "hf")
    ours = convert(str(tmp_path / "hf"), tmp_path / "ours")
    assert load_model(ours).args.max_seq_len == 64
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    out = tmp_path / "o.pt"
    r = subprocess.run([sys.executable, "train.py", "--model", str(ours), "--data", str(tmp_path / "d.json"),
                        "--out", str(out), "--max-seq-len", "128", "--max-steps", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --max-seq-len 128 is past the context of {ours}: 64 at most"], r.stderr
    assert not out.exists()
