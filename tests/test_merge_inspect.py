"""adapter.py merge / inspect / compare: a one-token Aligner folded exactly into wo biases, the
Hugging Face export read back by transformers, and the tools on our and the official files; compare's
token numbers (equal as stored and in bfloat16, within tolerances, what moved from a start) on tiny ones."""
import json
import re

import pytest
import torch
from conftest import assert_greedy_agree, make_model_dir
from conftest import official
from test_model import assert_clean_error, nonzero_aligner, run_cli, tokens

from adapter import merge
from support.adapter_file import load_aligner, save_aligner
from support.checkpoint import load_model
from support.tolerance import assert_close, logits_sums


def saved_adapter(path, tmp_path, n_tokens=1, per_layer=False):
    model = load_model(path)
    a = nonzero_aligner(model.args, n_tokens, per_layer=per_layer)
    a.meta["base"] = str(path)
    save_aligner(a, tmp_path / "a.pt")
    return model, a, tmp_path / "a.pt"


@pytest.mark.numeric
@pytest.mark.parametrize("gqa,per_layer", [(True, False), (False, False), (True, True)])
def test_merged_model_equals_base_plus_aligner(tmp_path, gqa, per_layer):
    _, path = make_model_dir(tmp_path, gqa=gqa)
    model, aligner, file = saved_adapter(path, tmp_path, per_layer=per_layer)
    merge(file, tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    assert merged.layers[2].attention.wo.bias is not None and merged.layers[1].attention.wo.bias is None
    with torch.no_grad():
        for seed in range(3):  # several prompts
            x = tokens(2, 9 + seed, seed=seed)
            expected = model(x, aligner)
            assert (expected - model(x)).abs().max() > 1e-3
            assert_close(merged(x), expected, **logits_sums(model.args, x.shape[1] + 1), what="logits")


@pytest.mark.numeric
def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    from transformers import LlamaForCausalLM

    _, path = make_model_dir(tmp_path, gqa=True)
    model, aligner, file = saved_adapter(path, tmp_path)
    r = run_cli("adapter.py", "merge", "--adapter", str(file), "--out", str(tmp_path / "export"), "--format", "hf")
    assert r.returncode == 0, r.stderr
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    x = tokens(2, 11)
    with torch.no_grad():
        assert_close(hf(x).logits, model(x, aligner), **logits_sums(model.args, x.shape[1] + 1), what="logits")


@pytest.mark.numeric
def test_hf_export_loads_with_auto_classes_and_generates_our_greedy_tokens(tmp_path):
    """AutoTokenizer finds the special tokens and the chat template and encodes as ours does (BOS
    first), AutoModelForCausalLM loads the merge, and transformers' greedy generate gives our tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generate import Sampling, generate
    from support.tokenizer import Tokenizer

    _, path = make_model_dir(tmp_path, gqa=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    model, aligner, file = saved_adapter(path, tmp_path)
    merge(file, tmp_path / "export", fmt="hf")
    tok, ours = AutoTokenizer.from_pretrained(tmp_path / "export"), Tokenizer(path)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<s>", "</s>", ours.eos_id)
    text = "the quick brown fox"
    assert tok(text).input_ids == ours.encode(text)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user: hi</s>"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    prompt = ours.encode(text)
    mine = list(generate(model, prompt, aligner, Sampling(max_new_tokens=12, temperature=0)))
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert_greedy_agree(model, prompt, aligner, mine, out[0, len(prompt):].tolist(), "transformers' generate")


def test_merge_refuses_more_than_one_token(tmp_path, tiny):
    _, path = tiny
    _, _, file = saved_adapter(path, tmp_path, n_tokens=3)
    r = run_cli("adapter.py", "merge", "--adapter", str(file), "--out", str(tmp_path / "m"))
    assert_clean_error(r, "3 tokens", "depend on each query")
    assert not (tmp_path / "m").exists()


def test_inspect_plot_and_compare(tmp_path, tiny):
    _, path = tiny
    _, a, file = saved_adapter(path, tmp_path, n_tokens=3)
    r = run_cli("adapter.py", "inspect", str(file))
    assert r.returncode == 0 and f"{a.n_params():,} parameters" in r.stdout and "mean|g|" in r.stdout
    pytest.importorskip("matplotlib")
    r = run_cli("adapter.py", "inspect", str(file), "--plot", str(tmp_path / "g.png"))
    assert r.returncode == 0 and (tmp_path / "g.png").stat().st_size > 1000


def test_compare_our_and_official_files(tmp_path, tiny):
    _, path = tiny
    _, a, file = saved_adapter(path, tmp_path)
    r = run_cli("adapter.py", "compare", str(file), str(file))
    assert r.returncode == 0 and "cosine +1.0000" in r.stdout and "exactly equal numbers 100.0%" in r.stdout
    sft = official("aligner1Token-llama2-7B-lr*")
    dpo = official("aligner1token-llama2-7B-DPO*")
    r = run_cli("adapter.py", "compare", str(sft), str(dpo))
    assert r.returncode == 0 and "tokens  cosine" in r.stdout, r.stderr
    x, y = load_aligner(sft).tokens.flatten(), load_aligner(dpo).tokens.flatten()
    expected = torch.nn.functional.cosine_similarity(x, y, dim=0).item()
    assert f"cosine {expected:+.4f}" in r.stdout
    r = run_cli("adapter.py", "compare", str(file), str(sft))
    assert r.returncode == 0 and "shapes differ" in r.stdout


def tokens_file(tmp_path, name, tokens, per_layer=False):
    """An adapter file of a 4-layer, 40-wide model holding exactly `tokens` ((N, 40), or (2, N, 40))."""
    from aligner import Aligner
    from model import ModelArgs

    a = Aligner(ModelArgs(dim=40, n_layers=4, n_heads=4, n_kv_heads=2), tokens.shape[-2], per_layer=per_layer)
    a.tokens.data.copy_(tokens)
    save_aligner(a, tmp_path / name)
    return tmp_path / name


def test_compare_counts_equal_numbers_tolerances_and_the_dimensions_that_move(tmp_path):
    from support.report import token_numbers

    start = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))  # (N, D): the shared init
    ramp = torch.arange(40.0) * (torch.arange(40) < 20)  # (D,): dims 0..19 move, 19 most, 20..39 not at all
    a, b = start + 0.004 * ramp, start + 0.0021 * ramp  # (N, D) each: same dims, B about half as far
    b[0, 39] += 1.0  # one number of B far off, in a dimension A leaves alone
    files = [tokens_file(tmp_path, f"{n}.pt", t) for n, t in (("a", a), ("b", b), ("start", start))]
    lines = token_numbers(*map(load_aligner, files))
    # unchanged: 2 rows x (dims 20..39 and dim 0, whose ramp is 0) = 42 of 80 in A, and in B but the far one
    assert "exactly equal as stored (float32 / float32) 51.2%" in lines[1]
    # |a - b| = 0.0019 d for d < 20: <= 0.001 only d = 0; <= 0.01 d <= 5; <= 0.1 every d; the far one never
    assert lines[2] == "  within |a - b| <= 0.001: 51.2%, 0.01: 63.7%, 0.1: 98.8%"
    assert "unchanged exactly A 52.5%, B 51.2%, both 51.2%" in lines[4]
    assert "move most (top 4 of 40 by mean |change|): 3 shared by A and B, 0.4 expected" in lines[5]
    big = (a.abs() >= 2) & (a == b)  # (N, D): the equal numbers of |a| >= 2
    assert lines[3].endswith(f"[2, inf) {100 * big.sum() / (a.abs() >= 2).sum():.1f}%")
    far = b.clone()
    far[:, :20] = start[:, :20]  # B now moves other dimensions than A: 20..39, none shared
    far[:, 20:] += 0.01 * torch.arange(20.0)
    lines = token_numbers(*map(load_aligner, [files[0], tokens_file(tmp_path, "far.pt", far), files[2]]))
    assert ": 0 shared by A and B" in lines[5] and "hypergeometric p = 1" in lines[5]


def test_compare_on_the_command_line_rounds_to_bfloat16_and_reads_leading_rows(tmp_path):
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(1))  # (N, D)
    near = x * (1 + 1e-5)  # (N, D): another float32 number, almost always the same bfloat16 one
    per_layer = torch.stack([x, x + 1.0])  # (2 gated layers, N, D): its first layer's prompt is x
    a, b, c = (tokens_file(tmp_path, "a.pt", x), tokens_file(tmp_path, "near.pt", near),
               tokens_file(tmp_path, "pl.pt", per_layer, per_layer=True))
    r = run_cli("adapter.py", "compare", str(a), str(b), "--init", str(a))
    assert r.returncode == 0, r.stderr
    equal = re.search(r"as stored \(float32 / float32\) ([\d.]+)%; both rounded to bfloat16 ([\d.]+)%",
                      r.stdout)
    assert float(equal.group(1)) < 5 and float(equal.group(2)) > 95, r.stdout
    assert "unchanged exactly A 100.0%" in r.stdout
    r = run_cli("adapter.py", "compare", str(a), str(c))
    assert r.returncode == 0 and "(the first 2 token rows of 2 and 4)" in r.stdout, r.stdout
    assert "as stored (float32 / float32) 100.0%" in r.stdout
    kept = load_aligner(a).to(torch.bfloat16)  # the same start, stored in bfloat16 as the official files
    save_aligner(kept, tmp_path / "bf16.pt")
    r = run_cli("adapter.py", "compare", str(tmp_path / "bf16.pt"), str(a), "--init", str(a))
    assert "as stored (bfloat16 / float32) 100.0%" in r.stdout, r.stdout  # compared as bfloat16 holds them
    assert "unchanged exactly A 100.0%, B 100.0%" in r.stdout  # the start rounded as each file keeps it
    r = run_cli("adapter.py", "compare", str(a), str(c), "--init", str(tmp_path / "missing.pt"))
    assert_clean_error(r, "missing.pt")
