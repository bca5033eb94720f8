"""The model's own chat template (support/chat.py), checked against transformers' apply_chat_template
token for token: SmolLM2's own template (the embedded default), and a LLaMA-3-style and a
Qwen-style template written here into tiny tokenizer configs, with and without a system message,
over several turns. Assistant-only labels by hand; multi-turn records (messages, ShareGPT, Alpaca);
train.py --template chat recording its template in the adapter; chat.py over turns,
/reset and a context too small for the history; refusals one line, exit 2, nothing written.

Run: .venv/bin/python -m pytest -q tests/test_chat.py"""
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, TINY_VOCAB, make_hf_model, make_tokenizer_json
from forkrun import run_text
from test_model import assert_clean_error

from support.chat import IGNORE, Chat, read_conversations, template_of
from support.checkpoint import copy_sentencepiece
from convert_weights import convert
from support.errors import UserError
from support.tokenizer import Tokenizer

# Written for these tests in the style of each family (not the released files): LLaMA-3 puts BOS
# in the text and ends each turn with <|eot_id|>; Qwen adds a default system turn and ends with <|im_end|>.
LLAMA3_STYLE = (
    "{{- bos_token }}\n"
    "{%- for m in messages %}\n"
    "    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n")
QWEN_STYLE = (
    "{% for m in messages %}\n"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}\n"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILIES = {  # specials (ids 0, 1, 2, ...), bos, eos (config.json's: the base model's end of text)
    "llama3": (["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", LLAMA3_STYLE),
    "qwen": (["<unk>", "<|unused|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>",
             QWEN_STYLE),
}
TEXT = ["You are a helpful assistant.", "Name a colour. Blue. Another? Green, of course.",
        "the quick brown fox jumps over the lazy dog", "system user assistant"]
CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green, of course."},
     {"role": "user", "content": "And the fox?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "the lazy dog"}],
]


def run_cli(*args, input=""):
    """`python ARGS` in the checkout, forked from a process that imported torch once (tests/forkrun.py)."""
    return run_text(list(args), input)


def chat_model(folder: Path, family: str) -> Path:
    """A tiny random LLaMA whose Hugging Face folder has a tokenizer of the family with its template,
    converted with convert_weights.py; returns the Hugging Face folder (ours is beside it)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    specials, bos, eos, template = FAMILIES[family]
    src = folder / "hf"
    make_hf_model().save_pretrained(src)
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(TEXT * 20, trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(src / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "add_bos_token": False, "chat_template": template}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    hf_cfg = json.loads((src / "config.json").read_text())
    hf_cfg.update(bos_token_id=specials.index(bos) if bos else None, eos_token_id=specials.index(eos))
    (src / "config.json").write_text(json.dumps(hf_cfg))
    convert(str(src), folder / "ours")
    return src


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    src = chat_model(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, src, src.parent / "ours"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The Qwen-style model alone, for the command-line tests (one family is enough there: the
    template's rendering is what differs, and that is checked for both above)."""
    src = chat_model(tmp_path_factory.mktemp("qwen-cli"), "qwen")
    return "qwen", src, src.parent / "ours"


def hf_ids(tokenizer, messages, generation_prompt: bool) -> list:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_the_family_templates_equal_transformers_token_for_token(family):
    from transformers import AutoTokenizer

    _, src, ours = family
    reference = AutoTokenizer.from_pretrained(src)
    chat = Chat(template_of(ours), Tokenizer(ours, TINY_VOCAB))
    for messages in CONVERSATIONS:
        assert chat.prompt_ids(messages) == hf_ids(reference, messages, True)
        ended = messages + [{"role": "assistant", "content": "Blue, of course."}]
        assert chat.example(ended)[0] == hf_ids(reference, ended, False)


def test_smollm2s_own_template_equals_transformers(smollm2_dir):
    from transformers import PreTrainedTokenizerFast

    template = template_of(smollm2_dir)
    assert "<|im_start|>" in template  # the GGUF's tokenizer.chat_template, carried by the conversion
    tok = Tokenizer(smollm2_dir)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"), chat_template=template,
                                        bos_token=tok.token_text(tok.bos_id), eos_token=tok.token_text(tok.eos_id))
    chat = Chat(template, tok)
    for messages in CONVERSATIONS:
        assert chat.prompt_ids(messages) == hf_ids(reference, messages, True)
    assert tok.token_text(chat.stop_id) == "<|im_end|>"


def test_only_assistant_turns_are_labelled_by_hand(family):
    kind, _, ours = family
    tok = Tokenizer(ours, TINY_VOCAB)
    chat = Chat(template_of(ours), tok)
    end = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>\n"}[kind]  # what the template writes after an answer
    assert tok.token_text(chat.stop_id) == end.strip()
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    ids, labels = chat.example(messages)
    runs, run = [], []
    for i, y in zip(ids, labels):
        assert y in (i, IGNORE)
        run += [i] if y != IGNORE else []
        if y == IGNORE and run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    assert runs == [tok.encode("Blue." + end, bos=False), tok.encode("Green." + end, bos=False)]
    unlabelled = tok.decode([i for i, y in zip(ids, labels) if y == IGNORE])
    assert "Name a colour." in unlabelled and "Another?" in unlabelled and "Blue" not in unlabelled


def test_the_three_record_forms_read_alike(tmp_path):
    same = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    records = [{"messages": same}, {"conversations": [{"from": "human", "value": "Name a colour."},
                                                      {"from": "gpt", "value": "Blue."}]},
               {"instruction": "Name a colour.", "output": "Blue."}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "c.json").write_text(json.dumps(records))
    assert read_conversations(tmp_path / "c.jsonl") == read_conversations(tmp_path / "c.json") == [same] * 3


@pytest.mark.parametrize("record, words", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0]: role 'bot' is not one of"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "messages[0]: 'content'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0]: from 'robot'"),
    ({"prompt": "x", "completion": "y"}, "has none of 'messages'"),
    ([1, 2], "is a list, not an object"),
])
def test_a_bad_record_is_one_line_naming_record_and_field(tmp_path, record, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "fine", "output": "fine"}, record]))
    with pytest.raises(UserError, match="record 1") as e:
        read_conversations(path)
    assert words in str(e.value)


def test_train_records_the_template_and_generate_chats_with_it(qwen, tmp_path):
    kind, _, ours = qwen
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c + [{"role": "assistant", "content": "Blue."}]})
                              for c in CONVERSATIONS) + "\n")
    out = tmp_path / "chat.pt"
    r = run_cli("train.py", "--model", str(ours), "--data", str(data), "--template", "chat", "--out", str(out),
                "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2", "--val-fraction", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    from support.adapter_file import load_aligner

    meta = load_aligner(out).meta
    assert meta["template"] == "chat" and meta["chat_template"] == template_of(ours)
    r = run_cli("chat.py", "--adapter", str(out), "--temperature", "0", "--max-new-tokens", "4",
                input="Name a colour.\nAnother?\n/reset\nHi\n/quit\nnever read\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "/reset starts over" in r.stderr and "starts over" in r.stderr.split("/reset starts over")[1]
    assert len(r.stdout.splitlines()) == 3  # three answers, one a line; the line after /quit is not read


def test_chat_drops_the_oldest_turns_to_fit_the_context(qwen, tmp_path):
    """With a context of 256 tokens and 100 new tokens at most, a long conversation keeps going: the
    oldest exchanges are dropped with a note, and a message longer than the context is refused."""
    _, _, ours = qwen
    turns = "".join(f"the quick brown fox jumps over the lazy dog {i}\n" for i in range(12))
    huge = "the lazy dog " * 200 + "\n"
    r = run_cli("chat.py", "--model", str(ours), "--no-adapter", "--temperature", "0",
                "--max-new-tokens", "100", input=turns + huge + "Hi\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "oldest exchange(s) were dropped" in r.stderr and "longer than the model's context" in r.stderr
    assert len(r.stdout.splitlines()) >= 13  # every message but the huge one answered


def test_a_message_longer_than_the_context_is_refused_and_the_conversation_goes_on(qwen, monkeypatch, capsys):
    """The turn before a refused message is still in the next prompt, and no exchange is said dropped
    (the refusal once emptied the history: the next answer forgot the first turn)."""
    import io

    from support.chat import converse

    _, _, ours = qwen
    chat = Chat(template_of(ours), Tokenizer(ours))
    lines = "My name is Zed.\n" + "word " * 400 + "\nWhat is my name?\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    prompts = []
    converse(chat, lambda ids: prompts.append(ids) or "Noted.", context=256, answer_room=16)
    said = capsys.readouterr().err
    assert len(prompts) == 2 and "longer than the model's context" in said and "dropped" not in said
    first = chat.prompt_ids([{"role": "user", "content": "My name is Zed."}])
    assert prompts[1][:len(first) - 2] == first[:len(first) - 2]  # the first turn opens the second prompt


def test_refusals_are_one_line_and_write_nothing(qwen, tmp_path):
    _, _, ours = qwen
    data = tmp_path / "d.json"
    out = tmp_path / "o.pt"
    cases = [  # (records, flags, words)
        ([{"messages": [{"role": "wizard", "content": "x"}]}], [], "role 'wizard'"),
        ([{"instruction": "a", "output": "b"}], ["--max-seq-len", "1000"], "past the context"),
        ([{"instruction": "a", "output": "b"}], ["--dpo"], "--template chat labels"),
    ]
    for records, flags, words in cases:
        data.write_text(json.dumps(records))
        r = run_cli("train.py", "--model", str(ours), "--data", str(data), "--template", "chat", "--out",
                    str(out), "--max-steps", "1", *flags)
        assert_clean_error(r, words)
        assert not out.exists() and not out.with_suffix(".metrics.jsonl").exists()
    from aligner import Aligner
    from support.adapter_file import save_aligner
    from support.checkpoint import read_params

    alpaca = tmp_path / "alpaca.pt"  # an Aligner trained in the Alpaca template: chat.py refuses it
    save_aligner(Aligner(read_params(ours / "params.json"), meta={"base": str(ours), "template": "alpaca"}),
                 alpaca)
    out.write_bytes(b"not an adapter")
    for flags, words in [([], "name one --adapter"), (["--adapter", str(out), "--no-adapter"], "name one"),
                         (["--adapter", str(out)], "o.pt"), (["--adapter", str(alpaca)], "trained with the alpaca template")]:
        assert_clean_error(run_cli("chat.py", "--model", str(ours), *flags, input="Hi\n"), words)


def test_a_template_that_fails_to_render_is_one_line(tmp_path, tiny):
    _, ours = tiny
    model = tmp_path / "model"
    model.mkdir()
    for f in ours.iterdir():
        (model / f.name).write_bytes(f.read_bytes()) if f.is_file() else None
    config = json.loads((model / "tokenizer_config.json").read_text())
    bad = {"unknown filter": "{{ messages | no_such_filter }}",
           "raise_exception": "{% if messages[0]['role'] == 'user' %}{{ raise_exception('system first') }}{% endif %}",
           "not jinja": "{% for %}",
           "a loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
           "a 2 GB string": "{{ 'x' * 2000000000 }}", "a recursive macro": "{% macro f() %}{{ f() }}{% endmacro %}"
           "{{ f() }}", "a width of 10**9": "{{ '{:>1000000000}'.format(1) }}"}
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    for name, template in bad.items():
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        r = run_cli("train.py", "--model", str(model), "--data", str(data), "--template", "chat",
                    "--out", str(tmp_path / "o.pt"), "--max-steps", "1")
        assert_clean_error(r, "chat template")
        assert not (tmp_path / "o.pt").exists(), name
    (model / "tokenizer_config.json").write_text(json.dumps(config))  # no template at all
    r = run_cli("train.py", "--model", str(model), "--data", str(data), "--template", "chat", "--out",
                str(tmp_path / "o.pt"))
    assert_clean_error(r, "has no chat template", "--template alpaca")


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than 0.5 s"),
    ("{% set ns = namespace(s='x') %}{% for i in range(10**5) %}{% for j in range(10**5) %}{% set ns.s = ns.s ~ 'x'"
     " %}{% set ns.s = ns.s[1:] %}{% endfor %}{% endfor %}", "took more than 0.5 s"),
    ("{{ 'ab' * 1000001 }}", "past 2,000,000"), ("{{ [1] * 3000000 }}", "past 2,000,000"),
    ("{{ 7 ** 100000000 }}", "past 2,000,000"), ("{{ '%9999999s' % 'a' }}", "wider than"),
    ("{{ 'a'|center(9999999) }}", "width past"), ("{{ '%9999999s'|format('a') }}", "wider than"),
    ("{{ '{x:>9999999}'.format_map({'x': 1}) }}", "wider than"),
    ("{% for i in range(3) %}{{ 'x' * 1000000 }}{% endfor %}", "passes 2,000,000"),  # 3 steps: no race
    ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    ("{{ 'x'.center(30000000) }}", "past 2,000,000"), ("{{ 'x'.zfill(30000000) }}", "past 2,000,000"),
    ("{{ '{:>{w}}'.format('x', w=30000000) }}", "wider than"), ("{{ '%*s' % (30000000, 'x') }}", "wider than"),
    ("{% set s = 'x' * 6000 %}{{ s.replace('', s) }}", "past 2,000,000"),
    ("{% set s = 'x' * 6000 %}{{ s|replace('', s) }}", "past 2,000,000"),
    ("{{ ('x' * 100000).join(['a'] * 1000) }}", "past 2,000,000"),
    ("{% set ns = namespace(s='x') %}{% for i in range(25) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "past 2,000,000"),
    ("{{ messages|tojson(indent=30000000) }}", "indent of more than 64"),
    ("{{ ((999 ** 4096) ** 4096) % 7 }}", "past 2,000,000"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ '{a}'.format() }}", "KeyError"),
    ("{{ 'a'.encode('nope') }}", "LookupError"), ("{{ '\\ud800' }}", "not valid Unicode"),
])
def test_a_strangers_template_is_stopped_at_its_limits(template, words):
    """Each way a template could take the process (time, memory, the stack) is one UserError. The loops
    meet a 0.5 s limit; the others a 60 s one, so that only their own check can stop them (no race)."""
    from support.chat import Limits

    seconds = 0.5 if "took more than" in words else 60
    with pytest.raises(UserError) as e:
        Chat(template, FakeTok(), Limits(seconds=seconds))
    assert words in str(e.value)


class FakeTok:
    """Just enough of a tokenizer for Chat: special tokens' text and an encoding."""
    bos_id, eos_id = 1, 2

    def token_text(self, i):
        return {1: "<s>", 2: "</s>"}[i]

    def encode(self, text, bos=False):
        return [ord(c) % 300 for c in text]


def test_within_the_limits_ordinary_templates_and_digits_render():
    """Digits in messages, widths under the limit, and long conversations are not refused."""
    chat = Chat("{% for m in messages %}{{ '%-8s'|format(m['role']) }}{{ '{:>12}'.format(m['role']) }}"
                "{{ m['content']|indent(2) }}{% endfor %}{% if add_generation_prompt %}{{ '%-8s'|format('assistant') }}"
                "{{ '{:>12}'.format('assistant') }}{% endif %}", FakeTok())
    messages = [{"role": "user", "content": "call 1234567890123 " * 50}] * 40
    assert "1234567890123" in chat.render(messages, True)


def test_a_meta_llama3_tiktoken_file_is_refused_and_tokenizer_json_is_used(tmp_path, tiny):
    tiktoken = tmp_path / "tokenizer.model"
    tiktoken.write_text("IQ== 0\nIg== 1\nIw== 2\n")  # "base64-token rank" lines: Meta's LLaMA-3 layout
    with pytest.raises(UserError, match="tiktoken BPE file .* tokenizer.json"):
        copy_sentencepiece(tiktoken, tmp_path, add_bos=True)
    _, ours = tiny
    src = tmp_path / "hf"
    make_hf_model().save_pretrained(src)
    make_tokenizer_json(src)
    (src / "tokenizer.model").write_bytes(tiktoken.read_bytes())  # beside tokenizer.json: that one is used
    converted = convert(str(src), tmp_path / "converted")
    assert (converted / "tokenizer.json").is_file() and not (converted / "tokenizer.model").exists()
    assert Tokenizer(converted).encode("the quick brown fox") == Tokenizer(ours).encode("the quick brown fox")


def test_the_bundled_conversations_are_the_training_letters_in_three_turns():
    sys.path.insert(0, str(ROOT / "data"))
    from make_form_data import chat_records, follows_form

    train = json.loads((ROOT / "data" / "form_train.json").read_text())
    conversations = read_conversations(ROOT / "data" / "form_chats.jsonl")
    assert [{"messages": c} for c in conversations] == chat_records(train)  # the file is what the maker writes
    assert len(conversations) == len(train) // 3 and all(len(c) == 6 for c in conversations)
    pairs = [(c[i]["content"], c[i + 1]["content"]) for c in conversations for i in (0, 2, 4)]
    records = Counter((r["instruction"] + (f"\n{r['input']}" if r["input"] else ""), r["output"]) for r in train)
    assert not Counter(pairs) - records  # each turn a training record, used no more often than it is there
    assert all(follows_form(answer) for _, answer in pairs)
