"""The graders: each checks one part of a student's copy of the primer against an independent
reference (transformers, PEFT, torch's own attention, the official released Aligner files, the
formulas written out) and says pass, or the measured difference and where to look.

    python lessons/graders.py STUDENT_DIR GRADER [GRADER ...]    (lessons.py check runs this)
    python lessons/graders.py --each DIR=GRADER,GRADER DIR=...   (many folders, one process: tests)

It runs with STUDENT_DIR first on the import path, so `import model` is the student's model.py.
Each grader returns (passed, what was measured); a NotImplementedError is "not written yet".
Not run on its own but by lessons.py. Read next: the lesson pages (lessons/1-attention.md ...).
"""
import atexit
import contextlib
import functools
import importlib.util
import io
import logging
import math
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official_aligner"
TERMS, DEPTH = 96, 5  # the tiny model's longest sum (feed-forward width) and its stages (4 layers, output)


def _project(path: str):
    """A file of the project loaded by its path (not the student's copy, which a student may change)."""
    spec = importlib.util.spec_from_file_location(f"project_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOLERANCE = _project("support/tolerance.py")
REFERENCES = _project("lessons/references.py")  # the reference checks the tests use too
nonzero_aligner = REFERENCES.nonzero_aligner


def tol(reference, terms=TERMS, depth=DEPTH, magnitude=None) -> float:
    """How far a correct answer may lie from `reference`: the rounding of two orders of the same sums
    (support/tolerance.py), never a number one machine printed."""
    size = reference.abs().max().item() if magnitude is None else magnitude
    return TOLERANCE.tolerance(torch.float32, size, terms, depth)


@functools.lru_cache
def tiny_folder() -> Path:
    """A random LlamaForCausalLM saved by transformers, and the same converted by the project's
    convert_weights.py (a lesson folder holds none), made once per process (non-trivial norms: ones
    would hide a missing norm)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    convert = _project("convert_weights.py").convert

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.08)
    folder = Path(tempfile.mkdtemp(prefix="aligner-lesson-"))
    atexit.register(shutil.rmtree, folder, True)  # a check leaves nothing behind in the temporary folder
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        hf.save_pretrained(folder / "hf")
        convert(str(folder / "hf"), folder / "ours")
    return folder


def tiny_pair():
    """(transformers' LlamaForCausalLM, the student's Transformer) with the same random weights:
    grouped-query attention, 4 layers, 4 heads, 2 key/value heads."""
    from transformers import LlamaForCausalLM

    from support.checkpoint import load_model

    folder = tiny_folder()
    return LlamaForCausalLM.from_pretrained(folder / "hf").eval(), load_model(folder / "ours")


def ids(b=2, t=13, seed=1):
    return torch.randint(3, 320, (b, t), generator=torch.Generator().manual_seed(seed))  # (B, T)


def diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def verdict(d: float, what: str, hint: str, limit: float):
    if d <= limit:
        return True, f"max |{what} diff| {d:.1e} (tolerance {limit:.1e})"
    return False, f"max |{what} diff| {d:.3g}, expected <= {limit:.2g}: {hint}"


# ---- lesson 1 -----------------------------------------------------------------------------------------
@torch.no_grad()
def attention_equals_sdpa():
    """One attention layer against torch's own scaled_dot_product_attention (causal, grouped-query)."""
    import model as m

    _, ours = tiny_pair()
    layer, e = ours.layers[0].attention, ours.args.head_dim
    x = torch.randn(2, 9, ours.args.dim)  # (B, T, D)
    pos = torch.arange(9)
    cos_sin = m.rope(pos.expand(2, 9), e, ours.args.rope_theta)
    mask = torch.zeros(9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))  # (T, S)
    got = layer(x, pos, cos_sin, mask.expand(2, 1, 1, 9, 9))  # (B, T, D)
    q = m.apply_rope(layer.wq(x).view(2, 9, -1, e), *cos_sin).transpose(1, 2)  # (B, H, T, E)
    k = m.apply_rope(layer.wk(x).view(2, 9, -1, e), *cos_sin).transpose(1, 2)  # (B, K, T, E)
    v = layer.wv(x).view(2, 9, -1, e).transpose(1, 2)  # (B, K, T, E)

    def reference(**options):
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **options)  # (B, H, T, E)
        return layer.wo(y.transpose(1, 2).flatten(2))  # (B, T, D)

    want = reference(is_causal=True)
    d, limit = diff(got, want), tol(want)
    if d > limit and diff(got, reference(is_causal=True, scale=1.0)) < limit:
        return False, f"max |output diff| {d:.3g}: look at the scale of the scores (divide by sqrt(E))"
    if d > limit and diff(got, reference(is_causal=False)) < limit:
        return False, f"max |output diff| {d:.3g}: every query sees every key; add the mask to the scores"
    return verdict(d, "output", "check the einsum subscripts against the legend, the softmax axis (the keys, "
                               "s) and which key/value head each query head reads (h = k * g + group)", limit)


@torch.no_grad()
def logits_equal_transformers():
    """The whole model against transformers' LlamaForCausalLM (grouped-query, einsum attention)."""
    hf, ours = tiny_pair()
    ours.use_sdpa(False)
    x = ids()
    got, want = ours(x), hf(x).logits
    d, limit = diff(got, want), tol(want)
    if d > limit and diff(got[:, 0], want[:, 0]) < limit:
        return False, (f"max |logit diff| {d:.3g}; position 0 (which attends to itself alone) agrees and "
                       f"later ones do not: look at what more keys change, the scale of the scores and the "
                       f"mask, and the rotation angles pos * theta^(-2i/E) of the pairs (x0, x1)")
    return verdict(d, "logit", "look at the attention scores, the mask and the grouped-query heads", limit)


# ---- lesson 2 -----------------------------------------------------------------------------------------
@torch.no_grad()
def cached_decoding_equals_recomputation():
    """Decoding with the KV cache, one token at a time, against recomputing the whole sequence, and
    greedy answers against transformers' generate."""
    from generate import Sampling, generate

    hf, ours = tiny_pair()
    seq = ids(1, 12)[0].tolist()
    cached, full = REFERENCES.cached_and_full(ours, seq)  # (T, vocab) each
    d, limit = diff(cached, full), tol(full)
    if d > limit:
        return False, (f"max |logit diff| {d:.3g} between cached and full decoding: KVCache.update must "
                       f"write xk, xv at columns pos of its buffers and return all of them")
    greedy = list(generate(ours, seq[:6], None, Sampling(max_new_tokens=8, temperature=0)))
    theirs = hf.generate(torch.tensor([seq[:6]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, 6:].tolist()
    same, account = TOLERANCE.check_greedy(
        greedy, theirs, lambda done: hf(torch.tensor([seq[:6] + done])).logits[0, -1], limit)
    if not same:
        return False, f"greedy tokens {greedy} but transformers gives {theirs}: {account}"
    return True, f"max |logit diff| {d:.1e}; 8 greedy tokens equal transformers'"


# ---- lessons 3 and 4 ----------------------------------------------------------------------------------
@torch.no_grad()
def zero_gates_add_nothing():
    """An Aligner whose gates are all zero gives exactly the base model."""
    _, ours = tiny_pair()
    a, with_it, without = REFERENCES.zero_gate_logits(ours, ids())
    if a.gates.abs().sum() != 0:
        return False, "a new Aligner's gates must start at zero (the model starts as exactly the base model)"
    d = diff(with_it, without)
    if d != 0:
        return False, (f"max |logit diff| {d:.3g} with zero gates, expected exactly 0: the gate multiplies "
                       f"the prefix attention's output (after its softmax), not the scores inside it")
    return True, "zero gates: exactly the base model"


def rope_calls(ours, a, x) -> int:
    """How often the student's forward calls apply_rope: q and k, twice a layer, when the prefix gets none."""
    import model as m

    calls, original = [], m.apply_rope
    m.apply_rope = lambda *args: calls.append(1) or original(*args)
    try:
        ours(x, a)
    finally:
        m.apply_rope = original
    return len(calls)


@torch.no_grad()
def aligner_equals_peft():
    """The Aligner against PEFT's AdaptionPrompt with the same prompt in every layer from 2 on and
    non-zero per-head gates, N = 1 and N = 3 (PEFT's own prefix code: no RoPE, its own softmax)."""
    results = []
    for n in (1, 3):
        hf, ours = tiny_pair()
        a, x = nonzero_aligner(ours.args, n), ids()
        want, _ = REFERENCES.peft_logits(hf, a, x)  # (B, T, vocab)
        d, limit = diff(ours(x, a), want), tol(want)
        results.append(d)
        if d > limit and rope_calls(ours, a, x) > 2 * ours.args.n_layers:
            return False, (f"N={n}: max |logit diff| {d:.3g}: the prefix keys get RoPE; "
                           f"the prefix has no position")
        if d > limit:
            return False, (f"N={n}: max |logit diff| {d:.3g}, expected <= {limit:.2g}: look at pk, pv = "
                           f"wk(P), wv(P) per key/value head, a softmax of their own over the N tokens (not "
                           f"joined to the causal one), and the gate of head h (h = k * g + group)")
    return True, f"N=1 and N=3: max |logit diff| {max(results):.1e} against PEFT"


def official_files_load_and_run():
    """The released Aligner files load into the student's Aligner with the paper's parameter counts,
    and give (tokens, gate) from layer 2 on; a per-layer variant counts (L - s) * N * D + (L - s) * H."""
    from aligner import Aligner
    from model import ModelArgs
    from support.adapter_file import load_aligner

    counts = {"aligner1[Tt]oken-llama2-7B-lr": 5056, "aligner10[Tt]oken-llama2-7B-lr": 41920,
              "aligner1[Tt]oken-llama2-13B-lr": 6640, "aligner10[Tt]oken-llama2-13B-lr": 52720}
    seen = []
    for prefix, count in counts.items():
        files = sorted(OFFICIAL.glob(f"{prefix}*.pth"))
        if not files:
            continue
        a = load_aligner(files[0])
        if a.n_params() != count:
            return False, f"{files[0].name}: {a.n_params():,} parameters, the paper says {count:,}"
        tokens, gate = a.prefix(a.n_layers - 1)
        if a.prefix(1) is not None or tuple(gate.shape) != (a.n_heads,) or tokens.shape[-1] != a.dim:
            return False, "prefix(layer) must be None below start_layer, else (tokens (N, D), gate (H,))"
        seen.append(f"{count:,}")
    per_layer = Aligner(ModelArgs(dim=64, n_layers=6, n_heads=4), 3, start_layer=2, per_layer=True)
    if per_layer.n_params() != 4 * 3 * 64 + 4 * 4:
        return False, f"per_layer=True: {per_layer.n_params()} parameters, expected {4 * 3 * 64 + 4 * 4}"
    return True, f"official files: {', '.join(seen) or 'none beside the checkout'}; per-layer count right"


# ---- lesson 5 -----------------------------------------------------------------------------------------
def batch_of(n=4, t=12, padding=True):
    from data import IGNORE, Batch

    x = ids(n, t, seed=7)  # (B, T)
    labels = x.clone()  # (B, T)
    labels[:, : t // 2] = IGNORE  # the prompt
    if padding:
        labels[0, -3:] = IGNORE  # padding
    return Batch(x, labels)


def loss_equals_full_logits():
    """sft_loss against the cross-entropy of the full logits (prompt and padding ignored), value and
    gradient."""
    from data import IGNORE
    from train import sft_loss

    _, ours = tiny_pair()
    a, batch = nonzero_aligner(ours.args, 2), batch_of()
    loss, _ = sft_loss(ours, a, batch)
    loss.backward()
    grad, a.gates.grad = a.gates.grad.clone(), None
    full = ours(batch.ids[:, :-1], a)  # (B, T-1, vocab)
    want = F.cross_entropy(full.flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE)
    want.backward()
    # the loss: another order of the output projection's and the loss's sums; the gradient: of every
    # layer's backward sums, over all the batch's positions
    d = max(diff(loss, want) / tol(want, 320, 2), diff(grad, a.gates.grad) / tol(grad, 320, 2 * DEPTH))
    return verdict(d, "loss or gradient (in tolerances)",
                   "the logits at t predict the token at t+1, and only labelled positions count", 1.0)


def steps(ours, micro: int, n: int, lr: float, batch):
    """The Aligner after n optimizer steps of train.py's train_step over the batch's 4 examples."""
    from data import Example, collate
    from support.parallel import Ranks
    from train import Run, TrainConfig, sft_loss, train_step

    a = nonzero_aligner(ours.args, 2)
    examples = [Example(i.tolist(), y.tolist(), []) for i, y in zip(batch.ids, batch.labels)]
    cfg = TrainConfig(data="x", batch_size=4, micro_batch_size=micro, lr=lr, warmup_steps=0, max_steps=n)
    optimizer = torch.optim.AdamW(a.parameters(), lr=cfg.lr, weight_decay=0.0)
    run = Run(ours, ours, type("Tok", (), {"pad_id": 0})(), a, sft_loss, collate, optimizer, examples, [],
              Ranks(0, 1, torch.device("cpu")), n, 0)
    for _ in range(n):
        train_step(run, cfg)
    return a


def accumulation_equals_one_batch():
    """Three steps of 4 examples as 2 micro-batches of 2 against 1 micro-batch of 4 (each example with
    as many labelled tokens): the same Aligner."""
    _, ours = tiny_pair()
    batch = batch_of(padding=False)
    a, b = steps(ours, 2, 3, 1e-2, batch), steps(ours, 4, 3, 1e-2, batch)
    d = max(diff(a.tokens, b.tokens), diff(a.gates, b.gates))
    limit = tol(None, 320, 2 * DEPTH, magnitude=3 * 1e-2)  # each AdamW step moves a number by about the lr
    return verdict(d, "Aligner", "each micro-batch's loss is divided by the number of micro-batches "
                                 "before backward, so the gradients add up to the mean's", limit)


def training_changes_only_the_aligner():
    """Ten steps lower the loss on the training examples, and the base weights stay as they were."""
    from train import sft_loss

    _, ours = tiny_pair()
    before, batch = {k: v.clone() for k, v in ours.state_dict().items()}, batch_of()
    trained = steps(ours, 2, 10, 3e-2, batch)
    with torch.no_grad():
        start, end = (sft_loss(ours, a, batch)[0].item() for a in (nonzero_aligner(ours.args, 2), trained))
    if not all(torch.equal(before[k], v) for k, v in ours.state_dict().items()):  # exact: never written
        return False, "the base model's weights changed: only the Aligner trains"
    if not end < start:
        return False, f"the loss went {start:.4f} -> {end:.4f} in 10 steps, expected lower"
    return True, f"loss {start:.4f} -> {end:.4f} in 10 steps; base weights unchanged"


# ---- lesson 6 -----------------------------------------------------------------------------------------
@torch.no_grad()
def merge_equals_base_plus_aligner():
    """A one-token Aligner folded into wo biases (merged_bias) against base + Aligner, grouped-query."""
    from dataclasses import replace

    from aligner import merged_bias
    from model import Transformer

    _, ours = tiny_pair()
    a, args = nonzero_aligner(ours.args, 1), ours.args
    state = dict(ours.state_dict())
    for layer in range(a.start_layer, args.n_layers):
        attention = ours.layers[layer].attention
        state[f"layers.{layer}.attention.wo.bias"] = merged_bias(a, layer, attention.wv.weight,
                                                                  attention.wo.weight, args)
    merged = Transformer(replace(args, wo_bias_from=a.start_layer)).eval()
    merged.load_state_dict(state)
    x = ids()
    want = ours(x, a)  # (B, T, vocab)
    return verdict(diff(merged(x), want), "logit",
                   "with one token the prefix softmax is 1, so each head adds g[h] * (wv p) of its "
                   "key/value head; wo maps the (H * E) vector to the bias", tol(want))


# ---- lesson 7 -----------------------------------------------------------------------------------------
def pairs_batch():
    from data import Example
    from dpo import Pair, collate_pairs

    batch = batch_of()
    ex = [Example(i.tolist(), y.tolist(), []) for i, y in zip(batch.ids, batch.labels)]
    return collate_pairs([Pair(ex[0], ex[1]), Pair(ex[2], ex[3])], 0, "cpu")


def direct_logprob(ours, a, ids_row, labels_row):
    """log p of the labelled tokens of one sequence, summed, from the full logits."""
    logp = ours(ids_row[None, :-1], a)[0].log_softmax(-1)  # (T-1, vocab)
    target = labels_row[1:]  # (T-1,)
    keep = target != -100  # (T-1,)
    return logp[keep].gather(-1, target[keep][:, None]).sum()


@torch.no_grad()
def dpo_equals_the_formula():
    """-logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))) written out per pair, beta 0.1, and
    exactly log 2 when the policy is the reference."""
    from dpo import DPOLoss

    _, ours = tiny_pair()
    policy, reference = nonzero_aligner(ours.args, 2, seed=1), nonzero_aligner(ours.args, 2, seed=2)
    batch = pairs_batch()
    got, _ = DPOLoss(reference, 0.1)(ours, policy, batch)
    terms, sizes = [], []
    for p in range(2):
        c, r = p, p + 2  # chosen first, then rejected
        lp = [direct_logprob(ours, m, batch.ids[i], batch.labels[i])
              for m in (policy, reference) for i in (c, r)]
        terms.append(-F.logsigmoid(0.1 * ((lp[0] - lp[1]) - (lp[2] - lp[3]))))
        sizes += [abs(v.item()) for v in lp]
    d = diff(got, torch.stack(terms).mean())
    # beta times a difference of four log-probabilities: their size sets the rounding
    limit = tol(None, 320, DEPTH + 1, magnitude=0.1 * 4 * max(sizes))
    if d > limit:
        return False, (f"max |loss diff| {d:.3g}: log-probabilities summed over the response tokens of each "
                       f"sequence, chosen rows first, then rejected; beta times the difference of margins")
    same, _ = DPOLoss(policy, 0.1)(ours, policy, batch)
    return verdict(abs(same.item() - math.log(2)), "loss - log 2 (policy = reference)",
                   "with the policy equal to the reference every margin is 0 and the loss log 2",
                   tol(None, 2, 2, magnitude=math.log(2)))


def dpo_keeps_one_base_model():
    """The reference policy is a frozen Aligner over the same base: the loss holds no model weights,
    and a step's gradient reaches the policy Aligner alone."""
    from aligner import Aligner
    from dpo import DPOLoss

    _, ours = tiny_pair()
    policy, reference = nonzero_aligner(ours.args, 1, seed=1), nonzero_aligner(ours.args, 1, seed=2)
    loss_fn = DPOLoss(reference, 0.1)
    modules = [v for v in vars(loss_fn).values() if isinstance(v, torch.nn.Module)]
    held = [m for m in modules if not isinstance(m, Aligner)]
    if held:
        return False, f"DPOLoss holds a {type(held[0]).__name__}: the reference is the base with an Aligner"
    loss_fn(ours, policy, pairs_batch())[0].backward()
    if policy.gates.grad is None or reference.gates.grad is not None:
        return False, "the gradient must reach the policy's Aligner and not the reference's (frozen)"
    return True, "one base model: the reference is a frozen Aligner; only the policy gets a gradient"


def quiet():
    """The references' own notices (kernels this build lacks, progress bars, deprecations) off."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main(student: str, names: list) -> int:
    """Run the graders on the student's folder; print a line each; the number that failed."""
    sys.path.insert(0, str(Path(student).resolve()))
    quiet()
    failed = 0
    for name in names:
        try:
            ok, detail = globals()[name]()
        except NotImplementedError as e:
            ok, detail = False, f"not written yet ({e})"
        except Exception as e:  # the student's code may fail in any way: say where
            where = traceback.extract_tb(e.__traceback__)[-1]
            ok, detail = False, f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return failed


def each(folders: list) -> int:
    """`FOLDER=grader,grader ...`: every folder graded in this one process (the references are
    imported once), the primer's modules imported afresh from each; the number of failures."""
    failed, primer = 0, ("model", "aligner", "data", "generate", "train", "dpo", "support")
    for spec in folders:
        folder, _, names = spec.rpartition("=")
        for name in [m for m in sys.modules if m.split(".")[0] in primer]:
            del sys.modules[name]
        tiny_folder.cache_clear()
        print(f"== {folder}", flush=True)
        failed += main(folder, names.split(","))
        sys.path.remove(str(Path(folder).resolve()))
    return failed


if __name__ == "__main__":
    if sys.argv[1] == "--each":
        sys.exit(1 if each(sys.argv[2:]) else 0)
    sys.exit(1 if main(sys.argv[1], sys.argv[2:]) else 0)
