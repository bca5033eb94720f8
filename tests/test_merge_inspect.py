"""adapter.py merge / inspect / compare: a one-token Aligner folded exactly into wo biases, the
Hugging Face export read back by transformers, and the tools on our and the official files."""
import pytest
import torch
from conftest import make_model_dir
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
