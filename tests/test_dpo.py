"""DPO with an Aligner (train.py --dpo): the loss against a direct computation of the formula,
log 2 at the first step, learning on a tiny preference set, and no second copy of the base model."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_model_dir
from test_model import assert_clean_error, nonzero_aligner, run_cli
from test_train_generate import train_args

import train
from support import checkpoint
from support.adapter_file import from_dict, load_aligner, to_dict
from support.checkpoint import load_model
from data import IGNORE, format_prompt
from support.tokenizer import Tokenizer
from dpo import DPOLoss, collate_pairs, make_pairs
from support.tolerance import assert_close, logits_sums

PAIRS = [{"instruction": f"Question {i}?", "chosen": f"yes good {i}", "rejected": f"no bad {i}"} for i in range(32)]


def direct_dpo_loss(model, tok, policy, reference, record, beta):
    """The formula, written out for one pair with no batching, padding or shared code."""
    prompt = format_prompt(record["instruction"])
    n = len(tok.encode(prompt))

    def logp(aligner, answer):
        ids = tok.encode(prompt + answer, eos=True)
        logits = model(torch.tensor([ids]), aligner)[0]  # (T, vocab)
        return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(n, len(ids)))

    pi_c, pi_r = logp(policy, record["chosen"]), logp(policy, record["rejected"])
    ref_c, ref_r = logp(reference, record["chosen"]), logp(reference, record["rejected"])
    return -torch.nn.functional.logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))


@pytest.mark.numeric
def test_loss_equals_the_formula(tiny):
    _, path = tiny
    model, tok = load_model(path), Tokenizer(path)
    policy, reference = nonzero_aligner(model.args, 2, seed=1), nonzero_aligner(model.args, 2, seed=2)
    records = [PAIRS[0], {"instruction": "A longer question here?", "chosen": "a much longer chosen answer", "rejected": "x"}]
    batch = collate_pairs(make_pairs(records, tok, 512).examples, tok.eos_id, "cpu")
    loss_fn = DPOLoss(reference, beta=0.1)
    with torch.no_grad():
        ours, _ = loss_fn(model, policy, batch)
        direct = torch.stack([direct_dpo_loss(model, tok, policy, reference, r, 0.1) for r in records]).mean()
        # the loss is beta times a difference of four sums of response log-probabilities: their size
        # sets the rounding (the logits at t predict the token at t+1)
        logps = model(batch.ids[:, :-1], policy).log_softmax(-1)  # (2B, T-1, vocab)
        response = logps.gather(-1, batch.ids[:, 1:, None])[..., 0] * (batch.labels[:, 1:] != IGNORE)  # (2B, T-1)
        magnitude = 0.1 * 4 * response.abs().sum(1).max().item()
    assert abs(direct.item() - math.log(2)) > 1e-3  # policy and reference really differ
    sums = logits_sums(model.args, batch.ids.shape[1])
    assert_close(ours, direct, terms=max(sums["terms"], model.args.vocab_size), depth=sums["depth"] + 1,
                 magnitude=magnitude, what="DPO loss")


@pytest.mark.numeric
def test_first_step_loss_is_log_2(tiny):
    _, path = tiny
    model, tok = load_model(path), Tokenizer(path)
    start = nonzero_aligner(model.args, 1)
    pairs = make_pairs(PAIRS[:4], tok, 512).examples
    loss_fn = DPOLoss(from_dict(to_dict(start)), beta=0.1)
    loss, stats = loss_fn(model, start, collate_pairs(pairs, tok.eos_id, "cpu"))
    # policy == reference: their log-probabilities cancel (the same numbers through the same kernels),
    # so the loss is -log sigmoid(0) = log 2, up to the rounding of log, sigmoid and the mean over pairs
    assert_close(loss, torch.tensor(math.log(2)), terms=len(pairs), depth=2, what="loss at the start")
    assert stats["reward_accuracy"] == 0.0


def sft_records():
    return [{"instruction": p["instruction"], "output": p["chosen"]} for p in PAIRS]


def test_dpo_learns_the_preference_with_one_base_model(tiny, tmp_path, monkeypatch):
    _, path = tiny
    (tmp_path / "prefs.json").write_text(json.dumps(PAIRS))
    (tmp_path / "sft.json").write_text(json.dumps(sft_records()))
    train.main(train_args(path, tmp_path / "sft.json", tmp_path / "sft.pt", "--max-steps", "1"))
    built = []
    monkeypatch.setattr(checkpoint, "load_model", lambda *a: (built.append(1), load_model(*a))[1])
    out = tmp_path / "dpo.pt"
    train.main(train_args(path, tmp_path / "prefs.json", out, "--dpo", "--init", str(tmp_path / "sft.pt"),
                          "--max-steps", "30", "--lr", "3e-2", "--batch-size", "8", "--micro-batch-size", "8",
                          "--eval-every", "0"))
    assert len(built) == 1  # the reference policy reuses the one base model
    rows = [json.loads(line) for line in (tmp_path / "dpo.metrics.jsonl").read_text().splitlines()]
    # policy == reference at the start: log 2, up to the rounding of the loss and the mean over 8 pairs
    assert_close(torch.tensor(rows[0]["loss"]), torch.tensor(math.log(2)), terms=8, depth=2, what="first loss")
    last = rows[-5:]
    assert sum(r["reward_accuracy"] for r in last) / 5 > 0.9 and all(r["margin"] > 0 for r in last)
    assert load_aligner(out).meta["mode"] == "dpo"
    r = run_cli("generate.py", "--adapter", str(out), "--prompt", "Question 40?", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


def peak_rss_mb(args):
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code, sys.executable, "train.py", *args],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def test_dpo_memory_is_one_model(tmp_path):
    """A 180 MB model and one short pair per step, so that the weights dominate the memory: a
    second copy of the base would add 180 MB to the DPO run's peak."""
    _, path = make_model_dir(tmp_path, layers=24, dim=512)
    base = ["--model", str(path), "--max-steps", "2", "--batch-size", "1", "--micro-batch-size", "1",
            "--eval-every", "0", "--quiet", "--device", "cpu"]
    (tmp_path / "sft.json").write_text(json.dumps(sft_records()))
    (tmp_path / "dpo.json").write_text(json.dumps(PAIRS))
    sft = peak_rss_mb([*base, "--data", str(tmp_path / "sft.json"), "--out", str(tmp_path / "a.pt")])
    dpo = peak_rss_mb([*base, "--data", str(tmp_path / "dpo.json"), "--out", str(tmp_path / "b.pt"), "--dpo",
                       "--init", str(tmp_path / "a.pt")])
    model_mb = (path / "model.safetensors").stat().st_size / 2**20
    assert model_mb > 170 and dpo < sft + 0.6 * model_mb, (sft, dpo, model_mb)


BAD_PAIRS = {
    "nochosen.json": ([{"instruction": "a", "rejected": "b"}], "record 0 has no 'chosen'"),
    "emptychosen.json": ([{"instruction": "a", "chosen": " ", "rejected": "b"}], "must not be empty"),
    "allsame.json": ([{"instruction": "a", "chosen": "b", "rejected": "b"}], "no usable preference pair"),
}


@pytest.mark.parametrize("name", sorted(BAD_PAIRS))
def test_bad_preference_data(tiny, tmp_path, name):
    _, path = tiny
    records, words = BAD_PAIRS[name]
    (tmp_path / name).write_text(json.dumps(records))
    r = run_cli("train.py", *train_args(path, tmp_path / name, tmp_path / "o.pt", "--dpo"))
    if name == "allsame.json":
        assert "identical; skipped" in r.stderr
        r.stderr = r.stderr.splitlines()[-1]
    assert_clean_error(r, words)
