"""convert_weights.py checks what it copies: a checkpoint's config fields (types and sizes), its
tokenizer files (the kind, every id inside the vocabulary) and its chat template (it compiles and
renders a trial conversation that writes the assistant's answer). Each damaged copy of a good tiny
checkpoint is refused with one line and exit code 2, leaving no output directory and no temporary;
the good one converts, the key map and q/k permutation both ways, and Meta's shards join exactly.

Run: .venv/bin/python -m pytest -q tests/test_convert.py"""
import json
import shutil

import pytest
import torch
from conftest import make_hf_model, make_tokenizer_json
from forkrun import run_text
from test_model import assert_clean_error

from convert_weights import HF_NAMES, convert, hf_layout, join_shards, permute, rename, unpermute

TEMPLATE = ("{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny Hugging Face checkpoint with a tokenizer.json and a chat template that work."""
    src = tmp_path_factory.mktemp("good") / "hf"
    make_hf_model().save_pretrained(src)
    make_tokenizer_json(src)
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "chat_template": TEMPLATE}))
    return src


def edit(name, change):
    """A change to the JSON file `name` of a checkpoint folder: change(the object) -> the new object."""
    def apply(folder):
        (folder / name).write_text(json.dumps(change(json.loads((folder / name).read_text()))))
    return apply


def config(**fields):
    return edit("config.json", lambda c: {**c, **fields})


def template(source):
    return edit("tokenizer_config.json", lambda c: {**c, "chat_template": source})


def bpe(change):
    return edit("tokenizer.json", lambda t: {**t, "model": change(t["model"])})


def write(name, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def wordpiece(folder):
    from tokenizers import Tokenizer, models

    pieces = models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]")
    Tokenizer(pieces).save(str(folder / "tokenizer.json"))


def sentencepiece_garbage(folder):
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x0a\x05hello not a model")


def sentencepiece_of_400(folder):
    """A real sentencepiece model of 400 pieces (256 of them bytes) beside a model of 320 tokens."""
    import io

    import sentencepiece

    text = [f"the quick brown fox jumps over the lazy dog {i} times, said Alice on day {i * 7}"
            for i in range(300)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=400,
                                             byte_fallback=True, minloglevel=2)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(model.getvalue())


def added_token(i):
    return edit("tokenizer.json", lambda t: {**t, "added_tokens": t["added_tokens"] + [
        {"id": i, "content": "<extra>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}]})


NO_ANSWER = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
CASES = {  # name: (the change, words the error line holds)
    "invalid jinja": (template("{% for m in messages %}{{ m['content'] }}"), "not valid jinja"),
    "a latin-1 chat_template.jinja": (write("chat_template.jinja", "{{ 'caf\xe9' }}".encode("latin-1")),
                                      "not UTF-8"),
    "a latin-1 tokenizer_config.json": (write("tokenizer_config.json", '{"chat_template": "caf\xe9"}'.encode(
        "latin-1")), "not valid JSON"),
    "a chat_template that is a number": (template(42), "chat_template is a int"),
    "named templates without a default": (template([{"name": "tool_use", "template": TEMPLATE}]),
                                          "'default'"),
    "a template that never writes the answer": (template(NO_ANSWER), "assistant's answer"),
    "a template that raises": (template("{{ raise_exception('no chat here') }}"), "cannot render"),
    "a WordPiece tokenizer.json": (wordpiece, "WordPiece"),
    "tokenizer.json not JSON": (write("tokenizer.json", b"{\"model\": "), "not valid JSON"),
    "tokenizer.json a list": (write("tokenizer.json", b"[1, 2]"), "JSON object"),
    "a BPE with no merges": (bpe(lambda m: {**m, "merges": []}), "without merges"),
    "a vocabulary id past the model's": (bpe(lambda m: {**m, "vocab": {**m["vocab"], "zzz": 5000}}), "5000"),
    "a vocabulary id that is text": (bpe(lambda m: {**m, "vocab": {**m["vocab"], "zzz": "7"}}), "'7'"),
    "an added token past the vocabulary": (added_token(320), "320 is outside"),
    "tokenizer_config.json a list": (write("tokenizer_config.json", b"[]"), "JSON object"),
    "add_bos_token a string": (edit("tokenizer_config.json", lambda c: {**c, "add_bos_token": "yes"}),
                               "add_bos_token"),
    "tokenizer.model not sentencepiece": (sentencepiece_garbage, "not a sentencepiece model"),
    "a sentencepiece model bigger than the vocabulary": (sentencepiece_of_400, "400 pieces"),
    "rope_scaling a list": (config(rope_scaling=[8.0, "llama3"]), "rope_scaling is [8.0"),
    "hidden_size a string": (config(hidden_size="64"), "hidden_size is '64'"),
    "num_hidden_layers true": (config(num_hidden_layers=True), "num_hidden_layers is True"),
    "zero heads": (config(num_attention_heads=0), "num_attention_heads is 0"),
    "a negative width": (config(intermediate_size=-96), "intermediate_size is -96"),
    "a fractional context": (config(max_position_embeddings=1.5), "max_position_embeddings is 1.5"),
    "heads that do not divide": (config(num_attention_heads=3, num_key_value_heads=3), "do not divide"),
    "head_dim zero": (config(head_dim=0), "head_dim is 0"),
    "tie_word_embeddings a string": (config(tie_word_embeddings="false"), "tie_word_embeddings"),
    "rms_norm_eps a string": (config(rms_norm_eps="1e-5"), "rms_norm_eps is '1e-5'"),
    "rope_theta a list": (config(rope_theta=[1e4]), "rope_theta is [10000.0], but a LLaMA needs a"),
    "bos_token_id a string": (config(bos_token_id="1"), "bos_token_id"),
    "eos_token_id an empty list": (config(eos_token_id=[]), "eos_token_id is []"),
    "a shard outside the folder": (write("model.safetensors.index.json", json.dumps(
        {"weight_map": {"lm_head.weight": "../model.safetensors"}}).encode()), "weight_map"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_damaged_checkpoint_is_one_line_and_writes_nothing(good, tmp_path, name):
    change, words = CASES[name]
    src = tmp_path / "src"
    shutil.copytree(good, src)
    change(src)
    assert_clean_error(run_text(["convert_weights.py", str(src), str(tmp_path / "out")]), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary


def test_the_good_checkpoint_converts_with_its_template(good, tmp_path):
    r = run_text(["convert_weights.py", str(good), str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE


@pytest.fixture(scope="module")
def meta(good, tmp_path_factory):
    """The good checkpoint in Meta's layout: params.json and one consolidated.00.pth."""
    from safetensors.torch import load_file

    ours = convert(str(good), tmp_path_factory.mktemp("ours") / "out")
    folder = tmp_path_factory.mktemp("meta")
    torch.save(load_file(ours / "model.safetensors"), folder / "consolidated.00.pth")
    params = json.loads((ours / "params.json").read_text())
    keep = ("dim", "n_layers", "n_heads", "n_kv_heads", "norm_eps", "rope_theta", "max_seq_len")
    (folder / "params.json").write_text(json.dumps({k: params[k] for k in keep}))
    return folder


@pytest.mark.parametrize("fields, words", [({"use_scaled_rope": "yes"}, "use_scaled_rope is 'yes'"),
                                           ({"n_kv_heads": "2"}, "n_kv_heads is '2', but a LLaMA needs"),
                                           ({"dim": False}, "dim is False, but a LLaMA needs"),
                                           ({"norm_eps": None, "n_layers": 0}, "n_layers is 0, but a LLaMA")])
def test_metas_params_fields_are_checked(meta, tmp_path, fields, words):
    src = tmp_path / "src"
    shutil.copytree(meta, src)
    edit("params.json", lambda p: {**p, **fields})(src)
    assert_clean_error(run_text(["convert_weights.py", str(src), str(tmp_path / "out")]), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_metas_shards_join_on_the_axis_each_weight_is_split_on(meta):
    """Two model-parallel shards cut as Meta's reference code cuts them join back to the whole."""
    whole = torch.load(meta / "consolidated.00.pth", weights_only=True)
    rows_split = ("wo.weight", "w2.weight", "tok_embeddings.weight")  # LLaMA-2: the embedding's width
    halves = [{}, {}]
    for key, w in whole.items():
        axis = None if w.dim() == 1 else 1 if key.endswith(rows_split) else 0
        for i in range(2):
            halves[i][key] = w if axis is None else w.chunk(2, dim=axis)[i]
    joined = join_shards(halves, dim=64)
    assert joined.keys() == whole.keys() and all(torch.equal(joined[k], whole[k]) for k in whole)


def test_the_key_map_and_the_permutation_go_both_ways(good):
    """HF -> ours -> HF gives back every tensor name and value; unpermute undoes permute, and pairs
    HF's coordinates j and j + E/2 as Meta's neighbours."""
    from safetensors.torch import load_file

    hf = load_file(good / "model.safetensors")
    names = {theirs: rename(theirs, HF_NAMES) for theirs in hf}
    assert names["model.layers.3.mlp.down_proj.weight"] == "layers.3.feed_forward.w2.weight"
    heads = {"wq": 4, "wk": 2}
    ours = {o: unpermute(hf[t], heads[o.split(".")[-2]]) if o.split(".")[-2] in heads else hf[t]
            for t, o in names.items()}
    from model import ModelArgs

    back = hf_layout(ModelArgs(dim=64, n_heads=4, n_kv_heads=2), ours)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    rows = torch.arange(16.0)[:, None]  # (16, 1): one head of width 16, HF's row order
    assert unpermute(rows, 1)[:4, 0].tolist() == [0.0, 8.0, 1.0, 9.0]
    assert torch.equal(permute(unpermute(rows, 1), 1), rows)
