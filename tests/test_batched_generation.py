"""Generation for many (generate.py --data, several Aligners in one batch, a cache made once):
batched greedy answers equal batch-1 answers token for token, a batch mixing Aligners gives each
row the logits it gets alone, a compiled decoding step is not recompiled for a second batch, and
the file mode's bad inputs are one line each."""
import json

import pytest
import torch
from conftest import assert_greedy_agree
from test_model import assert_clean_error, nonzero_aligner, run_cli, tokens

from aligner import Aligner, AlignerBatch
from support.adapter_file import save_aligner
from support.checkpoint import load_model
from generate import Sampling, generate, generate_batch
from model import ModelArgs
from support.tolerance import assert_close, logits_sums

GREEDY = Sampling(max_new_tokens=12, temperature=0)
PROMPTS = [[1, 5], list(range(3, 40)), [1, 9, 9, 9, 2, 7, 8], list(range(50, 70)), [4]]


def three_aligners(args: ModelArgs):
    """Different seeds, start layers and sharing, all with two tokens; gates non-zero."""
    a = nonzero_aligner(args, 2, seed=1)
    b = nonzero_aligner(args, 2, seed=2, per_layer=True)
    torch.manual_seed(3)
    c = Aligner(args, 2, start_layer=3)
    with torch.no_grad():
        c.gates.normal_(0, 0.5)
    return [a, b, c]


@pytest.mark.numeric
@pytest.mark.parametrize("with_aligner", [False, True])
def test_batched_greedy_equals_one_at_a_time(tiny, with_aligner):
    model = load_model(tiny[1])
    aligner = nonzero_aligner(model.args, 3) if with_aligner else None
    alone = [list(generate(model, p, aligner, GREEDY)) for p in PROMPTS]
    together = generate_batch(model, PROMPTS, aligner, GREEDY, pad_id=0)
    assert len(together) == len(PROMPTS) and all(len(a) == 12 for a in alone)
    model.use_sdpa()
    fused = generate_batch(model, PROMPTS, aligner, GREEDY, pad_id=0)
    model.use_sdpa(False)
    for p, a, t, f in zip(PROMPTS, alone, together, fused):
        assert_greedy_agree(model, p, aligner, t, a, "batched against alone")
        assert_greedy_agree(model, p, aligner, f, a, "batched sdpa against alone")


@pytest.mark.numeric
def test_a_batch_of_mixed_aligners_gives_each_row_its_own_logits(tiny):
    model = load_model(tiny[1])
    aligners = three_aligners(model.args)
    batch = AlignerBatch(aligners, model.args)
    batch.use([1, 0, 2, 3])  # Aligner 1, the base model, Aligner 2, Aligner 3
    ids = tokens(4, 11)
    with torch.no_grad():
        mixed = model(ids, batch)  # (4, T, vocab)
        alone = [model(ids[r:r + 1], a)[0] for r, a in enumerate([aligners[0], None, aligners[1], aligners[2]])]
        assert (alone[0] - model(ids[:1])[0]).abs().max() > 1e-3  # the Aligners really act
        base = model(ids)  # (4, T, vocab): the base model alone, the same batch shape (the same kernels)
    sums = logits_sums(model.args, ids.shape[1] + 2)
    for r in range(4):  # against batch 1: the CPU may pick another matrix kernel for 1 row than for 4
        assert_close(mixed[r], alone[r], **sums, what=f"logits of row {r}")
    # exact: the same kernels on the same inputs, and the base row's zero gates add 0.0
    assert torch.equal(mixed[1], base[1])


@pytest.mark.numeric
def test_mixed_aligners_decode_like_each_alone(tiny):
    model = load_model(tiny[1])
    aligners = three_aligners(model.args)
    batch = AlignerBatch(aligners, model.args)
    rows = [1, 0, 3, 2, 1]
    batch.use(rows)
    together = generate_batch(model, PROMPTS, batch, GREEDY, pad_id=0)
    alone = [list(generate(model, p, [None, *aligners][r], GREEDY)) for p, r in zip(PROMPTS, rows)]
    for p, r, t, a in zip(PROMPTS, rows, together, alone):
        assert_greedy_agree(model, p, [None, *aligners][r], t, a, f"row with Aligner {r}")


def test_a_second_batch_does_not_recompile(tiny):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model = load_model(tiny[1])
    batch = AlignerBatch(three_aligners(model.args), model.args)
    step = torch.compile(model, dynamic=False)
    pool = model.new_cache(3, max(map(len, PROMPTS)) + 4)  # buffers for the largest batch, reused
    batch.use([1, 2, 0])
    generate_batch(model, PROMPTS[:3], batch, Sampling(max_new_tokens=4, temperature=0), forward=step, pool=pool)
    compiled = counters["stats"]["unique_graphs"]
    batch.use([3, 0, 1])
    generate_batch(model, PROMPTS[2:], batch, Sampling(max_new_tokens=4, temperature=0), forward=step, pool=pool)
    assert compiled > 0 and counters["stats"]["unique_graphs"] == compiled


def test_answers_file_with_several_adapters(tiny, tmp_path):
    _, path = tiny
    model = load_model(path)
    files = []
    for i, a in enumerate(three_aligners(model.args)):
        a.meta["base"] = str(path)
        save_aligner(a, tmp_path / f"a{i}.pt")
        files += ["--adapter", str(tmp_path / f"a{i}.pt")]
    one = nonzero_aligner(model.args, 1)
    one.meta["base"] = str(path)
    save_aligner(one, tmp_path / "one.pt")  # another token count: a batch of its own
    records = [{"instruction": "Name item 1."}, {"instruction": "Say a much longer thing about item two.",
                                                  "input": "with an input"}]
    (tmp_path / "q.json").write_text(json.dumps(records))
    out = tmp_path / "answers.jsonl"
    r = run_cli("generate.py", *files, "--adapter", str(tmp_path / "one.pt"), "--compare", "--data",
                str(tmp_path / "q.json"), "--out", str(out), "--batch-size", "3", "--temperature", "0",
                "--max-new-tokens", "6", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 5 and {row["adapter"] for row in rows} == {"base", *files[1::2], str(tmp_path / "one.pt")}
    assert all(set(row) == {"instruction", "input", "adapter", "answer", "new_tokens"} for row in rows)
    tok_alone = run_cli("generate.py", "--adapter", files[3], "--prompt", "Name item 1.", "--temperature", "0",
                        "--max-new-tokens", "6", "--device", "cpu")
    assert tok_alone.stdout.strip() == next(r["answer"] for r in rows if r["adapter"] == files[3]).strip()


def test_answers_file_bad_inputs(tiny, tmp_path):
    _, path = tiny
    model = load_model(path)
    a = nonzero_aligner(model.args, 1)
    a.meta["base"] = str(path)
    save_aligner(a, tmp_path / "a.pt")
    (tmp_path / "q.json").write_text(json.dumps([{"instruction": "Hi."}]))
    out = tmp_path / "answers.jsonl"
    out.write_text("the user's earlier answers\n")
    base = ["--adapter", str(tmp_path / "a.pt"), "--out", str(out), "--device", "cpu", "--max-new-tokens", "2"]
    for size in ("0", "-2"):
        r = run_cli("generate.py", *base, "--data", str(tmp_path / "q.json"), "--batch-size", size)
        assert r.returncode == 2 and "--batch-size" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr
    save_aligner(Aligner(ModelArgs(dim=32, n_layers=4, n_heads=4)), tmp_path / "other.pt")
    assert_clean_error(run_cli("generate.py", *base, "--data", str(tmp_path / "q.json"), "--adapter",
                               str(tmp_path / "other.pt"), "--model", str(path)), "dim 32")
    (tmp_path / "noinstr.json").write_text(json.dumps([{"input": "x"}]))
    assert_clean_error(run_cli("generate.py", *base, "--data", str(tmp_path / "noinstr.json")), "no 'instruction'")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_clean_error(run_cli("generate.py", *base, "--data", str(tmp_path / "empty.txt")), "no prompts")
    (tmp_path / "empty.json").write_text("[]")
    assert_clean_error(run_cli("generate.py", *base, "--data", str(tmp_path / "empty.json")), "no records")
    assert_clean_error(run_cli("generate.py", *base[:2], "--data", str(tmp_path / "q.json")), "--out")
    assert out.read_text() == "the user's earlier answers\n"
