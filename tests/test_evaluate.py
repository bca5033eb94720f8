"""evaluate.py and the routes of lm-eval to an Aligner: the same local task (aligner_mc, a few documents)
through evaluate.py (our model as an lm-eval model), through serve.py (lm-eval's local-completions:
token-id prompts in lists, echo, logprobs) and through lm-eval's `hf` model on the Hugging Face export
(the base's, and the exact merge of a one-token Aligner) gives each document's loglikelihoods within
float32's tolerance and the same accuracy; bad flags are one line, exit 2. No hub: the tasks are local.

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py"""
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from test_model import assert_clean_error, nonzero_aligner, run_cli
from test_serve import free_port

from support.adapter_file import save_aligner
from support.checkpoint import load_model, read_state

lm_eval = pytest.importorskip("lm_eval")
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
LIMIT = 6  # documents: 24 loglikelihood requests a route


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """(our model directory, the one-token Aligner's file, the base's Hugging Face export, the merge's)."""
    from adapter import merge
    from convert_weights import hf_layout
    from support.hf import to_hf

    _, path = tiny
    folder = tmp_path_factory.mktemp("routes")
    a = nonzero_aligner(load_model(path).args, 1, seed=4)
    a.meta["base"] = str(path.resolve())
    save_aligner(a, folder / "one.pt")
    merge(folder / "one.pt", folder / "merged", fmt="hf")
    args, state = read_state(path)
    (folder / "base_hf").mkdir()
    to_hf(args, hf_layout(args, state), path, folder / "base_hf")
    return path, folder / "one.pt", folder / "base_hf", folder / "merged"


def per_document(results: dict) -> tuple:
    """({doc_id: [loglikelihood of each choice]}, accuracy) of one lm-eval run of aligner_mc."""
    samples = results["samples"]["aligner_mc"]
    return ({s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples},
            results["results"]["aligner_mc"]["acc,none"])


def lm_eval_run(model: str, model_args: dict) -> tuple:
    from lm_eval.tasks import TaskManager

    from evaluate import TASKS

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["aligner_mc"], limit=LIMIT,
                                      task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
                                      batch_size=4, bootstrap_iters=0)
    return per_document(results)


@pytest.fixture(scope="module")
def server_url(exports):
    """serve.py with the one-token Aligner ("one") and the base, on a free loopback port, in float32
    (as the other routes run on a CPU; its own default there may be bfloat16)."""
    import httpx

    path, one, _, _ = exports
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--adapter", str(one), "--port", str(port), "--slots", "4",
                             "--context", "256", "--dtype", "float32"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for _ in range(120):  # bounded: at most a minute to start
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            break
        except httpx.TransportError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1/completions"
    proc.kill()
    proc.wait()


def assert_routes_agree(routes: dict, args):
    """Every route's loglikelihoods equal the first's within float32's tolerance (a log_softmax over the
    vocabulary after every layer), and each document's choice and the accuracy are the same, unless
    two choices lie within that tolerance (a near tie another summation order may break)."""
    from support.tolerance import check_close, tolerance

    (first, (ours, acc)), *others = routes.items()
    terms, depth = max(args.dim, args.hidden_dim, args.vocab_size, args.max_seq_len), args.n_layers + 2
    for name, (theirs, their_acc) in others:
        assert sorted(theirs) == sorted(ours), name
        for doc, lls in ours.items():
            ok, account = check_close(torch.tensor(theirs[doc]), torch.tensor(lls), terms=terms, depth=depth)
            assert ok, f"{name} against {first}, document {doc}: {account}"
            top = sorted(lls, reverse=True)
            near = top[0] - top[1] <= 2 * tolerance(torch.float32, abs(top[0]), terms, depth)
            assert near or lls.index(top[0]) == theirs[doc].index(max(theirs[doc])), (name, doc)
        assert their_acc == acc or any(sorted(x)[-1] - sorted(x)[-2] < 1e-4 for x in ours.values()), name


@pytest.mark.numeric
def test_echo_logprobs_of_token_id_prompts_are_the_models(exports, server_url):
    """echo + logprobs + max_tokens 0 over a list of token-id prompts (what lm-eval's local-completions
    sends, with max_tokens 1): each prompt token's logprob is log_softmax of the model's own logits,
    the first null; the likeliest alternative is the model's; with one new token, it comes last."""
    import openai

    from support.adapter_file import load_aligner
    from support.tolerance import assert_close, logits_sums

    path, one, _, _ = exports
    client = openai.OpenAI(base_url=server_url.removesuffix("/completions"), api_key="none", max_retries=0)
    model, aligner = load_model(path), load_aligner(one)
    sums = logits_sums(model.args, model.args.vocab_size)  # log_softmax sums over the vocabulary
    prompts = [[5, 77, 140, 9, 200], [31, 8, 250]]
    r = client.completions.create(model="one", prompt=prompts, echo=True, logprobs=2, max_tokens=0, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == 8 and r.usage.completion_tokens == 0
    for ids, c in zip(prompts, r.choices):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]), aligner)[0], -1)  # (n, vocab)
        got = c.logprobs.token_logprobs
        assert got[0] is None and len(got) == len(ids) and c.logprobs.top_logprobs[0] is None
        expected = logp[torch.arange(len(ids) - 1), ids[1:]]  # (n - 1,)
        assert_close(torch.tensor(got[1:]), expected, **sums, what="prompt logprobs")
        best = logp[:-1].max(-1).values  # (n - 1,): the likeliest (two tokens may share a text, a key)
        assert_close(torch.tensor([max(t.values()) for t in c.logprobs.top_logprobs[1:]]), best, **sums,
                     what="top logprobs")
        assert all(1 <= len(t) <= 3 for t in c.logprobs.top_logprobs[1:])
        assert "".join(c.logprobs.tokens) == c.text
    more = client.completions.create(model="one", prompt=prompts[1], echo=True, logprobs=2, max_tokens=1,
                                     temperature=0)
    last = more.choices[0].logprobs
    assert last.token_logprobs[:-1] == r.choices[1].logprobs.token_logprobs and len(last.tokens) == 4
    assert last.token_logprobs[-1] == max(last.top_logprobs[-1].values())  # greedy: the likeliest


@pytest.mark.numeric
def test_the_routes_give_the_same_numbers(exports, server_url):
    """evaluate.py, serve.py through local-completions and --model hf on the export agree, for the
    base and for a one-token Aligner (its exact merge on the hf route)."""
    from evaluate import EvalConfig, evaluate
    from support.flags import Runtime

    path, one, base_hf, merged = exports
    ours = evaluate(EvalConfig(tasks="aligner_mc", adapter=[str(one)], base=True, limit=LIMIT, batch_size=4,
                               log_samples=True, output_path=str(one.with_name("ours.json"))), Runtime(device="cpu"))
    args = load_model(path).args
    for name, served, hf in (("base", "base", base_hf), (str(one), "one", merged)):
        api = {"model": served, "base_url": server_url, "tokenizer": str(hf), "tokenizer_backend": "huggingface",
               "tokenized_requests": True, "add_bos_token": True, "max_length": 255, "num_concurrent": 1,
               "max_retries": 1}
        routes = {"evaluate.py": per_document(ours[name]),
                  "serve.py + local-completions": lm_eval_run("local-completions", api),
                  "hf on the export": lm_eval_run("hf", {"pretrained": str(hf), "dtype": "float32", "device": "cpu"})}
        assert_routes_agree(routes, args)
    base_lls, aligned_lls = per_document(ours["base"])[0], per_document(ours[str(one)])[0]
    assert max(abs(x - y) for d in base_lls for x, y in zip(base_lls[d], aligned_lls[d])) > 1e-3  # it aligns


@pytest.mark.numeric
def test_rolling_loglikelihood_and_generation_are_the_models(exports):
    """loglikelihood_rolling of a text is the sum of its tokens' log-probabilities after the prefix
    token BOS, as lm-eval's hf model computes it (the text's own tokens start with BOS where the
    tokenizer adds one: that BOS is scored too), in one window; generate_until is generate.py's greedy answer, cut before
    the first stop string."""
    from lm_eval.api.instance import Instance

    from evaluate import aligner_lm
    from generate import Sampling, generate
    from support.adapter_file import load_aligner
    from support.checkpoint import load_base
    from support.flags import Runtime
    from support.tolerance import assert_close, logits_sums

    path, one, _, _ = exports
    base, aligner = load_base(path, Runtime(device="cpu"), torch.device("cpu")), load_aligner(one)
    text = "the quick brown fox jumps over the lazy dog " * 3
    ids = [base.tok.bos_id] + base.tok.encode(text)  # the prefix, then the text's tokens (BOS first)
    with torch.no_grad():
        logp = torch.log_softmax(base.model(torch.tensor([ids]), aligner)[0], -1)  # (n, vocab)
    expected = logp[torch.arange(len(ids) - 1), ids[1:]].sum()  # ()
    lm = aligner_lm(base, aligner, batch_size=2, max_length=255)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert_close(torch.tensor(got), expected, **logits_sums(base.model.args, base.model.args.vocab_size),
                 what="rolling loglikelihood")  # the errors add as the values do
    answer = base.tok.decode(list(generate(base.model, base.tok.encode("the lazy"), aligner,
                                           Sampling(max_new_tokens=10, temperature=0), base.tok.eos_id)))
    stop = answer[4:6] if len(answer) > 6 else "\0"
    got = lm.generate_until([Instance("generate_until", {}, ("the lazy", {"until": [stop], "max_gen_toks": 10}), 0),
                             Instance("generate_until", {}, ("the lazy", {"until": ["\0"], "max_gen_toks": 10}), 1)])
    assert got == [answer[: answer.find(stop)] if stop in answer else answer, answer]


def test_a_request_that_does_not_fit_max_length_is_cut_or_refused(exports):
    """generate_until keeps the question's last max_length - max_gen_toks tokens (as lm-eval's hf model
    does); an answer budget that leaves no room, or a continuation longer than max_length, is one
    clear error, not an index error deep in the model."""
    from lm_eval.api.instance import Instance

    from evaluate import aligner_lm
    from generate import Sampling, generate
    from support.checkpoint import load_base
    from support.errors import UserError
    from support.flags import Runtime

    base = load_base(exports[0], Runtime(device="cpu"), torch.device("cpu"))
    lm = aligner_lm(base, None, batch_size=2, max_length=8)
    text = "the quick brown fox jumps over the lazy dog"
    kept = base.tok.encode(text, bos=base.tok.add_bos)[-5:]  # 8 - 3 answer tokens
    answer = base.tok.decode(list(generate(base.model, kept, None, Sampling(max_new_tokens=3, temperature=0),
                                           base.tok.eos_id)))
    assert lm.generate_until([Instance("generate_until", {}, (text, {"until": ["\0"], "max_gen_toks": 3}), 0)]) \
        == [answer]
    with pytest.raises(UserError, match="max_gen_toks 8 leaves no room"):
        lm.generate_until([Instance("generate_until", {}, (text, {"until": ["\0"], "max_gen_toks": 8}), 0)])
    with pytest.raises(UserError, match="does not fit --max-length 8"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("the", " quick brown fox jumps over the lazy dog"), 0)])


@pytest.mark.parametrize("flags, words", [
    (["--tasks", "aligner_mc,", "--limit", "2"], "an empty task name"),
    (["--tasks", "aligner_mc", "--limit", "1e30"], "--limit 1e+30"),
    (["--tasks", "aligner_mc", "--gen-kwargs", "garbage"], "give k=v pairs"),
    (["--tasks", "aligner_mc", "--limit", "1.5"], "--limit 1.5"),
    (["--tasks", "aligner_mc", "--log-samples"], "--output-path"),
    (["--tasks", "no_such_task"], "no lm-eval task named no_such_task"),
])
def test_bad_flags_are_one_line(tiny, flags, words):
    r = run_cli("evaluate.py", "--model", str(tiny[1]), "--device", "cpu", *flags)
    assert_clean_error(r, words)


def test_a_flag_of_the_wrong_kind_is_argparses_usage_and_exit_2(tiny):
    r = run_cli("evaluate.py", "--model", str(tiny[1]), "--tasks", "aligner_mc", "--limit", "-3")
    assert r.returncode == 2 and "error: argument --limit: must be a finite number > 0" in r.stderr


def test_an_adapter_of_another_base_is_refused_before_any_evaluation(tiny, tmp_path):
    """Every adapter is checked against the base first: the good one is not evaluated and thrown away
    before the bad one is found, and the line names the bad file and the base, each as what it is."""
    from aligner import Aligner
    from model import ModelArgs

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    save_aligner(nonzero_aligner(load_model(tiny[1]).args, 1), good)
    save_aligner(Aligner(ModelArgs(dim=48, n_layers=3, n_heads=3), 1), bad)
    out = tmp_path / "results.json"
    r = run_cli("evaluate.py", "--model", str(tiny[1]), "--device", "cpu", "--tasks", "aligner_mc", "--limit",
                "2", "--base", "--adapter", str(good), "--adapter", str(bad), "--output-path", str(out))
    assert_clean_error(r, f"{bad}: this adapter is for a model with dim 48", f"but {tiny[1]} has dim")
    assert "aligner_mc" not in r.stdout and not out.exists()  # no table printed: nothing evaluated
