"""train.py and generate.py end to end on a tiny model: the loop, --resume, the safety of the
user's files, and every bad input named in the issue (one line on stderr, exit code 2)."""
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, official
from test_model import assert_clean_error, run_cli

import train
from support.adapter_file import load_aligner
from support.checkpoint import load_model
from data import IGNORE, PROMPT_NO_INPUT, encode_example, format_prompt
from support.tokenizer import Tokenizer
from generate import Sampling, generate
from support.tolerance import assert_close, logits_sums

RECORDS = [{"instruction": f"Name item {i}.", "input": "" if i % 3 else "a list", "output": f"Item {i} is here."}
           for i in range(24)]


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def train_args(model_path, data, out, *extra):
    return ["--model", str(model_path), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--micro-batch-size", "2", "--warmup-steps", "2", "--eval-every", "3", "--eval-batches", "1",
            "--val-fraction", "0.2", "--quiet", "--device", "cpu", *extra]


def losses(metrics):
    return [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]


def test_alpaca_template_is_exact():
    assert format_prompt("Do X.") == ("Below is an instruction that describes a task. Write a response that "
                                      "appropriately completes the request.\n\n### Instruction:\nDo X.\n\n### Response:")
    assert format_prompt("Do X.", "Y") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n### Input:\nY"
        "\n\n### Response:")
    assert PROMPT_NO_INPUT.endswith("### Response:")


def test_labels_mask_the_prompt(tiny):
    _, path = tiny
    tok = Tokenizer(path)
    prompt = format_prompt("Say hi.")
    ids, labels, _ = encode_example(tok, prompt, "hi there", 512, full_text=False)
    n = len(tok.encode(prompt))
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert labels[:n] == [IGNORE] * n and labels[n:] == ids[n:]
    ids2, labels2, _ = encode_example(tok, prompt, "hi there", 512, full_text=True)
    assert labels2 == ids2
    assert encode_example(tok, prompt, "hi there", n, full_text=False) is None  # nothing left to learn


@pytest.mark.numeric
@pytest.mark.parametrize("attention", ["einsum", "sdpa"])
def test_loss_on_labelled_positions_equals_the_full_loss(tiny, attention):
    """The output projection runs only where there is a label; the loss (and its gradient) must be
    the cross-entropy of the full logits with the prompt and padding ignored. The two differ only
    in the order of the output projection's and the loss's sums (over the width, the vocabulary and
    the labelled positions), and in the gradient also in the backward pass through every layer."""
    from data import collate, load_examples
    from test_model import nonzero_aligner

    _, path = tiny
    model, tok = load_model(path), Tokenizer(path)
    model.use_sdpa(attention == "sdpa")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "r.json").write_text(json.dumps(RECORDS[:6]))
        batch = collate(load_examples(Path(d) / "r.json", tok, 256).examples, tok.eos_id, "cpu")
    aligner = nonzero_aligner(model.args, 2)
    ours, _ = train.sft_loss(model, aligner, batch)
    ours.backward()
    grad, aligner.gates.grad = aligner.gates.grad.clone(), None
    full = model(batch.ids[:, :-1], aligner)  # (B, T-1, vocab)
    reference = torch.nn.functional.cross_entropy(full.flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE)
    reference.backward()
    assert (batch.labels == IGNORE).float().mean() > 0.3  # prompts and padding really are skipped
    n = int((batch.labels != IGNORE).sum())
    assert_close(ours, reference, terms=max(model.args.dim, model.args.vocab_size, n), depth=2, what="loss")
    sums = logits_sums(model.args, batch.ids.numel())  # a gate's gradient sums over every position
    assert_close(grad, aligner.gates.grad, terms=sums["terms"], depth=2 * sums["depth"], what="gate gradients")


def test_get_lr_warms_up_in_optimizer_steps():
    cfg = train.TrainConfig(data="x", lr=0.01)
    lrs = [train.get_lr(s, cfg, total_steps=20, warmup_steps=4) for s in range(20)]
    # Python's floats are IEEE doubles on every machine: approx absorbs only the literals' rounding
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01]) and set(lrs[4:]) == {0.01}
    cfg.schedule = "cosine"
    cos = [train.get_lr(s, cfg, 20, 4) for s in range(20)]
    assert cos[4] == pytest.approx(0.01) and cos[-1] < 0.002 and cos == sorted(cos[:4]) + sorted(cos[4:], reverse=True)


def test_training_learns_and_only_the_aligner_changes(tiny, data, tmp_path):
    _, path = tiny
    out = tmp_path / "new" / "folder" / "a.pt"  # made on the way
    before = {k: v.clone() for k, v in load_model(path).state_dict().items()}
    train.main(train_args(path, data, out, "--max-steps", "12", "--lr", "3e-2"))
    ls = losses(out.with_suffix(".metrics.jsonl"))
    assert len(ls) == 12 and sum(ls[-3:]) / 3 < sum(ls[:3]) / 3
    aligner = load_aligner(out)
    assert aligner.gates.abs().sum() > 0 and aligner.meta["base"] == str(path.resolve())
    after = load_model(path).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # exact: the frozen base is never written
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 12 and "optimizer" in ckpt


@pytest.mark.numeric
def test_resume_gives_the_same_losses(tiny, data, tmp_path):
    """Exact: the resumed run does the same arithmetic on the same inputs in the same order (the same
    batches from the seed and the step, the Aligner and AdamW's state restored bit for bit)."""
    _, path = tiny
    train.main(train_args(path, data, tmp_path / "full.pt", "--max-steps", "6"))
    train.main(train_args(path, data, tmp_path / "part.pt", "--max-steps", "3"))
    train.main(train_args(path, data, tmp_path / "part.pt", "--max-steps", "6", "--resume"))
    full, part = losses(tmp_path / "full.metrics.jsonl"), losses(tmp_path / "part.metrics.jsonl")
    assert len(part) == 6 and full == part
    a, b = load_aligner(tmp_path / "full.pt"), load_aligner(tmp_path / "part.pt")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.gates, b.gates)


def test_per_layer_and_more_tokens(tiny, data, tmp_path):
    _, path = tiny
    train.main(train_args(path, data, tmp_path / "p.pt", "--max-steps", "2", "--per-layer", "--tokens", "3"))
    a = load_aligner(tmp_path / "p.pt")
    assert a.per_layer and a.tokens.shape == (2, 3, 64) and a.n_params() == 2 * 3 * 64 + 2 * 4


def wait_for_steps(folder, metrics_name, n, seconds=60):
    """Until the run's staged metrics (its own temporary, put in place only at a save) hold n lines."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        for staged in (p for p in folder.iterdir() if p.name.startswith(f".{metrics_name}.")):
            try:
                if staged.read_text().count("\n") >= n:
                    return
            except FileNotFoundError:
                pass
        time.sleep(0.2)


def stop_a_long_run(path, data, out, signum, steps: int):
    """Start a training that would run for ever, send `signum` once it has done `steps` steps;
    (exit code, stdout, stderr). It starts ignoring SIGINT, as a shell starts a command with `&`."""
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(path, data, out, "--max-steps", "100000",
                                                                     "--eval-every", "0", "--save-every", "0")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for_steps(out.parent, out.with_suffix(".metrics.jsonl").name, steps)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


def test_ctrl_c_saves_and_exits_cleanly(tiny, data, tmp_path):
    code, stdout, stderr = stop_a_long_run(tiny[1], data, tmp_path / "c.pt", signal.SIGINT, 2)
    assert code == 130 and "Traceback" not in stderr, stderr
    assert "interrupted: saved" in stdout
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] >= 2


def test_sigterm_saves_like_ctrl_c_and_leaves_no_temporary(tiny, data, tmp_path):
    """SIGTERM (kill, docker stop, a scheduler): the step finishes, the checkpoint and its metrics are
    saved, exit code 143, and no temporary file of the run is left beside them."""
    code, stdout, stderr = stop_a_long_run(tiny[1], data, tmp_path / "t.pt", signal.SIGTERM, 3)
    assert code == 143 and "Traceback" not in stderr, stderr
    assert "terminated: saved" in stdout
    step = torch.load(tmp_path / "t.pt", weights_only=True)["step"]
    assert step >= 3 and len(losses(tmp_path / "t.metrics.jsonl")) == step
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_generate_from_adapter_alone_stdin_compare_and_no_adapter(tiny, data, tmp_path):
    _, path = tiny
    out = tmp_path / "g.pt"
    train.main(train_args(path, data, out, "--max-steps", "2"))
    r = run_cli("generate.py", "--adapter", str(out), "--prompt", "Name item 3.", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = subprocess.run([sys.executable, "generate.py", "--adapter", str(out), "--max-new-tokens", "4", "--compare",
                        "--temperature", "0"], cwd=ROOT, input="first\n\nsecond\n", capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("--- base:") == 2 and r.stdout.count("--- aligned:") == 2, r.stderr
    r = run_cli("generate.py", "--model", str(path), "--no-adapter", "--template", "raw", "--prompt", "x", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr


def test_generate_sampling_is_seeded_and_stops(tiny):
    _, path = tiny
    model = load_model(path)
    torch.manual_seed(0)
    hot, greedy_8 = Sampling(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9), Sampling(8, temperature=0)
    a = list(generate(model, [1, 5, 6], sampling=hot))
    torch.manual_seed(0)
    b = list(generate(model, [1, 5, 6], sampling=hot))
    assert a == b and len(a) == 8  # exact: the same seed, kernels and inputs in one process
    greedy = list(generate(model, [1, 5, 6], sampling=greedy_8))
    stop = list(generate(model, [1, 5, 6], sampling=greedy_8, eos_id=greedy[2]))
    assert stop == greedy[: greedy.index(greedy[2]) + 1]


def test_trainable_count_on_the_embedded_default(smollm2_dir, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(RECORDS[:4]))
    r = run_cli("train.py", "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "s.pt"), "--max-steps", "1",
                "--batch-size", "2", "--micro-batch-size", "2", "--eval-every", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "828 trainable parameters" in r.stdout


BAD_DATA = {
    "invalid.json": ('[{"instruction": "a", "output": "b"},\n {"instruction": oops}]', "line 2, column"),
    "notlist.json": ('{"instruction": "a", "output": "b"}', "expected a list"),
    "nofield.json": ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "record 1 has no 'output'"),
    "notstring.json": ('[{"instruction": "a", "output": 5}]', "record 0: field 'output' is a int"),
    "empty.json": ("[]", "no records"),
    "bad.jsonl": ('{"instruction": "a", "output": "b"}\n{broken\n', "line 2"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_one_clear_line(tiny, tmp_path, name):
    _, path = tiny
    text, words = BAD_DATA[name]
    (tmp_path / name).write_text(text)
    out = tmp_path / "keep.pt"
    out.write_bytes(b"the user's precious file")
    assert_clean_error(run_cli("train.py", *train_args(path, tmp_path / name, out)), name, words)
    assert out.read_bytes() == b"the user's precious file"


def test_other_bad_inputs(tiny, data, tmp_path):
    _, path = tiny
    out = tmp_path / "keep.pt"
    out.write_bytes(b"mine")
    assert_clean_error(run_cli("train.py", *train_args(path, tmp_path / "missing.json", out)), "not found")
    (tmp_path / "latin1.json").write_bytes('[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))
    assert_clean_error(run_cli("train.py", *train_args(path, tmp_path / "latin1.json", out)), "not UTF-8")
    assert_clean_error(run_cli("train.py", *train_args(path, data, out, "--max-seq-len", "8")), "--max-seq-len")
    assert_clean_error(run_cli("train.py", *train_args(path, data, out, "--resume")), "keep.pt")
    assert out.read_bytes() == b"mine"
    (tmp_path / "text.pth").write_text("404: Not Found\n")
    assert_clean_error(run_cli("generate.py", "--adapter", str(tmp_path / "text.pth"), "--prompt", "x"), "text.pth")
    train.main(train_args(path, data, tmp_path / "ok.pt", "--max-steps", "1"))
    good = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    assert_clean_error(run_cli("generate.py", "--adapter", str(tmp_path / "cut.pt"), "--prompt", "x"), "cut.pt")
    official_file = official("aligner1Token-llama2-7B*")
    assert_clean_error(run_cli("generate.py", "--adapter", str(official_file), "--model", str(path), "--prompt", "x"),
                       "dim 4096")
    assert_clean_error(run_cli("generate.py", "--adapter", str(tmp_path / "ok.pt"), "--prompt", "word " * 300),
                       "context")
