"""The graders: each checks one property of a student's copy of the primer against an independent
reference (transformers, PEFT, torch's own attention, the official released Aligner files, the
formulas written out) and says pass, or the measured difference and the mistake it points at.

    python lessons/graders.py STUDENT_DIR GRADER [GRADER ...]    (lessons.py check runs this)
    python lessons/graders.py --each DIR=GRADER,GRADER DIR=...   (many folders, one process: tests)

A lesson's graders run in the order lessons/catalog.py lists them, one property at a time (K = H
before K < H, one token before three, each row of a batch, without a cache before with one, float32
before bfloat16, one backward before an optimizer step), so the first FAIL names one cause; where a
known mistake (lessons/mistakes.py) explains the measured difference, the message names it. A FAIL
after the first begins with AFTER: its explanation assumes that the checks above it passed.
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


def explains(hint: str):
    """A grader whose student code may raise (a shape or dtype that does not fit): the error, where it
    was raised, and `hint`, the property this grader isolates, instead of a bare traceback."""
    def wrap(grader):
        @functools.wraps(grader)
        def run():
            try:
                return grader()
            except NotImplementedError:
                raise
            except Exception as e:  # the student's code may fail in any way: say where, and what to look at
                where = traceback.extract_tb(e.__traceback__)[-1]
                at = f"{Path(where.filename).name}:{where.lineno}"
                return False, f"{type(e).__name__}: {e} (at {at}): {hint}"
        return run
    return wrap


def first_known(got, limit, known) -> str:
    """The message of the first known mistake, (make its output, message), whose output is `got`."""
    for make, message in known:
        if diff(got, make()) <= limit:
            return message
    return ""


SMALL = dict(dim=64, n_layers=4, n_heads=4, vocab_size=320, hidden_dim=96, max_seq_len=64)


def random_model(kv_heads=2, seed=0, dtype=torch.float32):
    """The student's Transformer with random weights (no file, no reference library): 4 layers, 4 query
    heads, `kv_heads` key/value heads; attention weights large enough that every softmax is sharp."""
    from model import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs(n_kv_heads=kv_heads, **SMALL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.25 if ".attention." in name else 0.08)
    return model.to(dtype).requires_grad_(False).eval()


def layer_run(layer, x, prefix=None):
    """(the student's attention layer on x (B, T, D) from position 0 with the causal mask forward
    passes it, the rope it used)."""
    import model as m

    b, t, _ = x.shape
    pos = torch.arange(t)
    cos_sin = m.rope(pos.expand(b, t), layer.head_dim, 10000.0)  # (B, T, 1, E) each
    mask = torch.zeros(t, t).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))  # (T, S)
    return layer(x, pos, cos_sin, mask.expand(b, 1, 1, t, t), prefix), cos_sin  # (B, T, D)


def heads(layer, x, cos_sin):
    """q (B, H, T, E), and k, v repeated to the query heads that read them (B, H, T, E): grouped-query
    order h = kv head * g + group, written out with repeat_interleave."""
    import model as m

    b, t, _ = x.shape
    h, kv, e = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = m.apply_rope(layer.wq(x).view(b, t, h, e), *cos_sin).transpose(1, 2)  # (B, H, T, E)
    k = m.apply_rope(layer.wk(x).view(b, t, kv, e), *cos_sin).transpose(1, 2)  # (B, K, T, E)
    v = layer.wv(x).view(b, t, kv, e).transpose(1, 2)  # (B, K, T, E)
    return q, k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)  # (B, H, T, E) each


def causal_y(q, k, v, scale=None, masked=True, axis=-1):
    """softmax(q k^T * scale + mask) v before wo, (B, T, H * E); the options write known mistakes."""
    t = q.shape[2]
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, T, S)
    if masked:
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))  # (B, H, T, S)
    return (s.softmax(axis) @ v).transpose(1, 2).flatten(2)  # (B, T, H * E)


def attention_check(kv_heads: int, label: str, hint: str):
    """One layer of the student's attention, 2 rows of 9 positions, against the softmax written out;
    on a difference, the known mistake it matches, or `hint`."""
    layer = random_model(kv_heads).layers[0].attention
    x = torch.randn(2, 9, SMALL["dim"], generator=torch.Generator().manual_seed(1))  # (B, T, D)
    got, cos_sin = layer_run(layer, x)  # (B, T, D)
    q, k, v = heads(layer, x, cos_sin)
    want = layer.wo(causal_y(q, k, v))  # (B, T, D)
    d, limit, e = diff(got, want), tol(want), layer.head_dim
    if d <= limit:
        return True, f"{label}: max |output diff| {d:.1e} (tolerance {limit:.1e})"
    if not torch.isfinite(got).all():
        return False, (f"{label}: the output holds inf or NaN: the mask's -inf is added to the scores before "
                       f"the softmax (which turns it into a weight of 0), never after")
    known = [(lambda: layer.wo(causal_y(q, k, v, scale=1.0)), "the scores are not scaled: divide q . k by "
                                                              "sqrt(E)"),
             (lambda: layer.wo(causal_y(q, k, v, scale=1 / e)), "the scores are divided by E: by sqrt(E)"),
             (lambda: layer.wo(causal_y(q, k, v, scale=layer.n_heads ** -0.5)),
              "the scores are divided by sqrt(H), the number of heads: by sqrt(E), the head width"),
             (lambda: layer.wo(causal_y(q, k, v, masked=False)),
              "every query sees every key: add the mask (0 or -inf) to the scores"),
             (lambda: layer.wo(causal_y(q, k, v, axis=-2)),
              "the softmax runs over the queries t: it runs over the keys s, the last axis of (b, k, g, t, "
              "s)"),
             (lambda: layer.wo(causal_y(q, k, k)), "the weights multiply the keys: y = att . v, the values")]
    why = first_known(got, limit, known) or hint
    return False, f"{label}: max |output diff| {d:.3g}, expected <= {limit:.2g}: {why}"


# ---- lesson 1 -----------------------------------------------------------------------------------------
@torch.no_grad()
def attention_equal_heads():
    """One attention layer with as many key/value heads as query heads (K = H = 4): the scores, the
    mask, the softmax and the values, before grouped-query heads come in."""
    return attention_check(4, "K = H", "check the einsum subscripts against the legend: scores (b, k, g, t, "
                                       "s) "
                                       "from q (b, t, k, g, e) and k (b, s, k, e), y (b, t, k, g, e)")


@torch.no_grad()
def attention_grouped_query():
    """The same with grouped-query heads (K = 2 < H = 4): which key/value head each query head reads."""
    return attention_check(2, "K < H", "K = H passes and K = 2 < H = 4 does not: query head h = k * g + "
                                       "group "
                                       "reads key/value head k; y (b, t, k, g, e) flattens back in that "
                                       "order")


CAUSAL_CACHE = ("with the KV cache there are s > t keys, every cached column, and the mask passed in "
                "(b, 1, 1, t, s) hides those not written yet: use it, not a mask built from t")


@torch.no_grad()
@explains(CAUSAL_CACHE)
def attention_with_cache():
    """The model decoding one token at a time through the KV cache (t = 1 query, s keys) against the
    whole sequence at once (K < H, no Aligner)."""
    cached, full = REFERENCES.cached_and_full(random_model(2), ids(1, 12)[0].tolist())  # (T, vocab) each
    return verdict(diff(cached, full), "logit (cached against full)", "one token at a time through the "
                   "KV cache does not give the whole sequence's logits: " + CAUSAL_CACHE, tol(full))


def bf16_limit(want, depth=DEPTH) -> float:
    """bfloat16 against float32: a few roundings of bfloat16 in each of `depth` stages (a check that it
    runs in the model's dtype and does not drift, not of the formula: float32 did that)."""
    return TOLERANCE.tolerance(torch.bfloat16, want.abs().max().item(), 4, depth)


@torch.no_grad()
@explains("in a bfloat16 model every tensor stays in the model's dtype: the softmax runs in float32 "
          "(.float()) and its weights go back with .type_as(xq) before the product with the values")
def attention_in_bfloat16():
    """The model in bfloat16 (as on a GPU) runs and gives bfloat16 logits near float32's."""
    x = ids()
    want, got = random_model(2)(x), random_model(2, dtype=torch.bfloat16)(x)  # (B, T, vocab) each
    return verdict(diff(got, want), "logit, bfloat16 against float32", "in bfloat16 the softmax still runs "
                   "in float32 and comes back with .type_as(xq)", bf16_limit(want))


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
def rotated(x, pos, theta: float, exponent=2, sign=1, inv_freq=None):
    """x (1, T, heads, E) with each pair (x0, x1) = (x[2i], x[2i+1]) turned by pos * theta^(-exponent i/E):
    (x0 cos - x1 sin, x1 cos + x0 sin), written out (sign -1: the other way)."""
    e = x.shape[-1]
    if inv_freq is None:
        inv_freq = theta ** (-exponent * torch.arange(e // 2).float() / e)  # (E/2,)
    angle = (pos[0, :, None].float() * inv_freq)[None, :, None]  # (1, T, 1, E/2)
    c, s = angle.cos(), sign * angle.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]  # (1, T, heads, E/2) each
    return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), -1).flatten(-2)  # (1, T, heads, E)


@torch.no_grad()
@explains("rope(pos (B, T), E, theta) returns cos and signed sin, (B, T, 1, E) each, fp32")
def rope_rotates_pairs():
    """apply_rope with the student's rope turns each pair (x0, x1) by pos * theta^(-2i/E), E = 16."""
    import model as m

    pos, theta = torch.arange(11)[None], 10000.0  # (1, T)
    cos, sin = m.rope(pos, 16, theta)
    if tuple(cos.shape) != (1, 11, 1, 16) or tuple(sin.shape) != (1, 11, 1, 16):
        return False, (f"rope gave {tuple(cos.shape)} and {tuple(sin.shape)}: cos and sin are (B, T, 1, E) "
                       f"each")
    x = torch.randn(1, 11, 2, 16, generator=torch.Generator().manual_seed(0))  # (1, T, heads, E)
    got, want = m.apply_rope(x, cos, sin), rotated(x, pos, theta)  # (1, T, heads, E) each
    d, limit = diff(got, want), tol(want, 2, 2)
    if d <= limit:
        return True, f"max |rotated diff| {d:.1e} (tolerance {limit:.1e})"
    if not torch.equal(cos[..., 0::2], cos[..., 1::2]):
        return False, (f"max |rotated diff| {d:.3g}: cos does not repeat each angle in place: Meta's pairs "
                       "are "
                       "neighbours (x[2i], x[2i+1]), so cos is [c0, c0, c1, c1, ...] (repeat_interleave(2, "
                       "-1)), "
                       f"not two halves [c0, c1, ..., c0, c1, ...]")
    known = [(lambda: rotated(x, pos, theta, sign=-1), "the pairs turn the wrong way: x0's slot of sin is "
                                                       "-sin, "
              "x1's +sin, so that (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)"),
             (lambda: rotated(x, pos, theta, exponent=1), "the frequencies: pair i turns at theta^(-2i/E), "
              "i = 0 .. E/2 - 1 (arange(0, E, 2) / E), not theta^(-i/E)")]
    return False, (f"max |rotated diff| {d:.3g}, expected <= {limit:.2g}: "
                   f"{first_known(got, limit, known) or 'cos, sin of pos * theta^(-2i/E), one per pair'}")


@torch.no_grad()
@explains("with `args` whose rope_factor is not 1, inv_freq goes through scaled_frequencies(inv_freq, args)")
def rope_scales_long_context():
    """With args whose rope_factor is 8 (LLaMA-3.1's long context), the frequencies come from
    scaled_frequencies (already written): the angles are not those of rope_factor 1."""
    import model as m

    args = m.ModelArgs(dim=64, n_heads=4, rope_factor=8.0, rope_original_context=64)  # E = 16
    pos, theta = torch.arange(0, 200, 7)[None], 10000.0  # (1, T)
    x = torch.randn(1, pos.shape[1], 2, 16, generator=torch.Generator().manual_seed(0))  # (1, T, heads, E)
    inv_freq = m.scaled_frequencies(theta ** -(torch.arange(0, 16, 2).float() / 16), args)  # (E/2,)
    got, want = m.apply_rope(x, *m.rope(pos, 16, theta, args)), rotated(x, pos, theta, inv_freq=inv_freq)
    d, limit = diff(got, want), tol(want, 2, 2)
    if d > limit and diff(got, rotated(x, pos, theta)) <= limit:
        return False, (f"max |rotated diff| {d:.3g}: with rope_factor 8 the angles are those of rope_factor "
                       "1: "
                       f"pass inv_freq through scaled_frequencies(inv_freq, args) when args.rope_factor != 1")
    return verdict(d, "rotated", "with args, the angles are pos * scaled_frequencies(theta^(-2i/E), args)",
                   limit)


def cache_writes(m):
    """(what update returned at each call, what it should have): 3 tokens at columns 0-2, one at 3,
    then rows at their own columns (pos (B, T)), then one row of a 2-row cache."""
    g = torch.Generator().manual_seed(0)
    a, b, c, one = (torch.randn(shape, generator=g) for shape in [(2, 3, 2, 4), (2, 1, 2, 4), (2, 2, 2, 4),
                                                                    (1, 1, 2, 4)])
    cache, rows_cache = m.KVCache(2, 8, 2, 4, torch.float32, "cpu"), m.KVCache(2, 8, 2, 4, torch.float32,
                                                                               "cpu")
    want = [torch.zeros(2, 8, 2, 4) for _ in range(4)]  # (B, S, K, E) each
    want[0][:, :3] = a
    want[1][:, :3], want[1][:, 3:4] = a, b
    want[2][0, 2:4], want[2][1, 5:7] = c[0], c[1]
    want[3] = want[1][:1].clone()
    want[3][0, 4] = one[0, 0]
    got = [cache.update(torch.arange(3), a, a)[0].clone(), cache.update(torch.tensor([3]), b, b)[0].clone(),
           rows_cache.update(torch.tensor([[2, 3], [5, 6]]), c, c)[0].clone()]
    return got + [cache.update(torch.tensor([4]), one, one)[0]], want


@torch.no_grad()
@explains("update(pos, xk, xv) writes xk, xv (B, T, K, E) into the buffers at columns pos and returns the "
          "first B rows of every column, (B, S, K, E)")
def kv_cache_keeps_every_column():
    """KVCache.update on its own: what it returns after prefill, after a step, with each row at its own
    columns (pos (B, T): left-padded rows), and for a batch smaller than the buffers."""
    import model as m

    got, want = cache_writes(m)
    what = ["3 tokens written at columns 0-2", "then 1 token at column 3",
            "rows at their own columns (pos [[2, 3], [5, 6]], (B, T))", "then 1 row of the 2-row cache at "
                                                                        "column 4"]
    for step, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape):
            return False, (f"after {what[step]}: update returned keys {tuple(g.shape)}, expected "
                           f"{tuple(w.shape)}: every column S of the first B rows (the mask hides columns "
                           "not "
                           f"written yet)")
        if not torch.equal(g, w):
            return False, (f"after {what[step]}: the returned keys are not the ones written there: write at "
                           f"columns pos (row r at pos[r] when pos is (B, T)) and keep the earlier columns")
    return True, "prefill, one step, rows at their own columns, a smaller batch: every column as written"


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
                       f"the prefix attention's output py (after its softmax): not the scores inside it, and "
                       f"not left out")
    return True, "zero gates: exactly the base model"


def rope_calls(run) -> int:
    """How often run() (the student's forward) calls apply_rope: q and k, twice a layer, when the
    prefix gets none."""
    import model as m

    calls, original = [], m.apply_rope
    m.apply_rope = lambda *a: calls.append(1) or original(*a)
    try:
        run()
    finally:
        m.apply_rope = original
    return len(calls)


def prefix_y(layer, q, tokens, gates, scale=None, axis=-1, values=True):
    """gate[h] * softmax(q . pk / sqrt(E)) pv, the prefix's part before wo, (B, T, H * E), written out with
    the key/value heads repeated: tokens (B or 1, N, D), gates (B or 1, H), q (B, H, T, E)."""
    b, h, kv, e = q.shape[0], layer.n_heads, layer.n_kv_heads, layer.head_dim
    tokens, gates = tokens.expand(b, *tokens.shape[1:]), gates.expand(b, h)  # (B, N, D), (B, H)
    pk = layer.wk(tokens).view(b, -1, kv, e).transpose(1, 2).repeat_interleave(h // kv, 1)  # (B, H, N, E)
    pv = layer.wv(tokens).view(b, -1, kv, e).transpose(1, 2).repeat_interleave(h // kv, 1)  # (B, H, N, E)
    att = (q @ pk.transpose(-1, -2) * (e ** -0.5 if scale is None else scale)).softmax(axis)  # (B, H, T, N)
    return (gates[:, :, None, None] * (att @ (pv if values else pk))).transpose(1,
                                                                                2).flatten(2)  # (B, T, H*E)


def prefix_inputs(kv_heads: int, n: int, rows: int, dtype=torch.float32):
    """(a layer of the student's model, x (2, 9, D), tokens (rows, n, D), gates (rows, H)): rows = 1 is
    one Aligner for the batch, 2 one per row; the gates non-zero (zero would switch the prefix off)."""
    g = torch.Generator().manual_seed(2)
    layer = random_model(kv_heads, dtype=dtype).layers[0].attention
    x = torch.randn(2, 9, SMALL["dim"], generator=g).to(dtype)  # (B, T, D)
    tokens = torch.randn(rows, n, SMALL["dim"], generator=g)  # (rows, N, D)
    return layer, x, tokens, torch.randn(rows, SMALL["n_heads"], generator=g)  # gates (rows, H)


def prefix_check(kv_heads: int, n: int, rows: int, label: str, hint: str):
    """One layer with an Aligner prefix against the formula written out; on a difference, the known
    mistake it matches, the rows that differ, or `hint`."""
    layer, x, tokens, gates = prefix_inputs(kv_heads, n, rows)
    prefix = (tokens[0], gates[0]) if rows == 1 else (tokens, gates)  # (N, D), (H,) or (B, N, D), (B, H)
    got, cos_sin = layer_run(layer, x, prefix)  # (B, T, D)
    q, k, v = heads(layer, x, cos_sin)
    base = causal_y(q, k, v)  # (B, T, H * E)
    want = layer.wo(base + prefix_y(layer, q, tokens, gates))  # (B, T, D)
    d, limit = diff(got, want), tol(want)
    if d <= limit:
        return True, f"{label}: max |output diff| {d:.1e} (tolerance {limit:.1e})"
    rows_off = [r for r in range(2) if diff(got[r], want[r]) > limit]
    if rows > 1 and len(rows_off) == 1:
        hint = (f"row {1 - rows_off[0]} agrees and row {rows_off[0]} does not: with one Aligner per row, "
                "prefix "
                f"is (b, n, D) and (b, h), and each row uses its own tokens and gates")
    if rope_calls(lambda: layer_run(layer, x, prefix)) > 2:
        return False, (f"{label}: max |output diff| {d:.3g}: the prefix keys get RoPE; the prefix has no "
                       f"position")
    known = [(lambda: layer.wo(base + prefix_y(layer, q, tokens, gates, axis=-2)),
              "the prefix softmax runs over the queries t: it runs over the n tokens, the last axis of (b, "
              "k, g, t, n)"),
             (lambda: layer.wo(base + prefix_y(layer, q, tokens, gates, scale=1.0)),
              "the prefix scores are not scaled: q . pk / sqrt(E), as the causal scores"),
             (lambda: layer.wo(base + prefix_y(layer, q, tokens, gates, values=False)),
              "the prefix weights multiply pk: py = p_att . pv, the values"),
             (lambda: layer.wo(base + prefix_y(layer, q, tokens, gates * 0 + 1)),
              "the gate is left out: y + gate[h] * py, the gate of head h")]
    why = first_known(got, limit, known) or hint
    return False, f"{label}: max |output diff| {d:.3g}, expected <= {limit:.2g}: {why}"


@torch.no_grad()
def prefix_one_token():
    """One Aligner token (N = 1), K = H, one Aligner for the batch: the prefix's softmax is over a single
    token (its weight is 1), so this isolates what it weighs: the values, the gate, where it is added."""
    return prefix_check(4, 1, 1, "N = 1, K = H", "with one token a softmax of its own gives it weight 1 for "
                                                 "every "
                        "query: y + gate[h] * pv (the values wv(P) of head h's key/value head), added "
                        "before wo; "
                        "the prefix is not joined to the causal keys' softmax")


@torch.no_grad()
def prefix_several_tokens():
    """Three Aligner tokens (N = 3), K = H: now the prefix scores matter."""
    return prefix_check(4, 3, 1, "N = 3, K = H", "N = 1 passes and N = 3 does not, so look at the scores of "
                                                 "the "
                        "n tokens: q . pk / sqrt(e), pk = wk(P) without RoPE, a softmax of their own over n")


@torch.no_grad()
def prefix_grouped_query():
    """N = 3 with grouped-query heads (K = 2 < H = 4): which gate and which pk, pv each query head gets."""
    return prefix_check(2, 3, 1, "N = 3, K < H", "K = H passes and K = 2 < H = 4 does not: query head h = k "
                                                 "* g + "
                        "group reads pk, pv of key/value head k, and its gate is gate[h]: gate (h,) viewed "
                        "as (k, g)")


@torch.no_grad()
def prefix_per_row():
    """A batch whose two rows have different Aligners (prefix (b, n, D) and (b, h), as AlignerBatch and
    serving pass it), each row checked on its own."""
    return prefix_check(2, 3, 2, "one Aligner per row", "expand pk, pv to (b, n, k, e) and the gate to (b, "
                                                        "h): "
                        "a shared prefix and one per row then take the same code path")


PREFIX_CACHE = ("with a cache, pk and pv come from cache.aligner_kv (new_cache computed them once), and the "
                "prefix is added at every step")


@torch.no_grad()
@explains(PREFIX_CACHE)
def prefix_with_cache():
    """Decoding with an Aligner (N = 3, K < H) one token at a time through the KV cache against the whole
    sequence at once: what generate.py and serving run."""
    model = random_model(2)
    a = nonzero_aligner(model.args, 3)
    cached, full = REFERENCES.cached_and_full(model, ids(1, 12)[0].tolist(), a)  # (T, vocab) each
    return verdict(diff(cached, full), "logit (cached against full)", "decoding through the KV cache "
                   "does not give the whole sequence's logits: " + PREFIX_CACHE, tol(full))


@torch.no_grad()
@explains("in a bfloat16 model the Aligner stays float32 (it trains): its tokens go to the model's dtype "
          "(prefix_kv does it), the gate with .to(y.dtype), the prefix softmax's weights with .type_as(xq)")
def prefix_in_bfloat16():
    """The layer in bfloat16 with a float32 Aligner (tokens, gates), as generate.py runs it on a GPU:
    bfloat16 out, near float32's."""
    layer, x, tokens, gates = prefix_inputs(2, 3, 1)
    half = random_model(2, dtype=torch.bfloat16).layers[0].attention
    want, _ = layer_run(layer, x, (tokens[0], gates[0]))  # (B, T, D)
    got, _ = layer_run(half, x.bfloat16(), (tokens[0], gates[0]))  # (B, T, D)
    if got.dtype != torch.bfloat16:
        return False, (f"the output is {got.dtype} in a bfloat16 model: bring the gate to y's dtype "
                       f"(.to(y.dtype))")
    return verdict(diff(got, want), "output, bfloat16 against float32", "the prefix path in bfloat16: the "
                                                                        "softmax "
                   "in float32, back with .type_as(xq)", bf16_limit(want, 2))


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
        if d > limit and rope_calls(lambda: ours(x, a)) > 2 * ours.args.n_layers:
            return False, (f"N={n}: max |logit diff| {d:.3g}: the prefix keys get RoPE; "
                           f"the prefix has no position")
        if d > limit:
            return False, (f"N={n}: max |logit diff| {d:.3g}, expected <= {limit:.2g}: look at pk, pv = "
                           f"wk(P), wv(P) per key/value head, a softmax of their own over the N tokens (not "
                           f"joined to the causal one), and the gate of head h (h = k * g + group)")
    return True, f"N=1 and N=3: max |logit diff| {max(results):.1e} against PEFT"


NO_GRADIENT = ("no torch.no_grad and no .detach() on the prefix path (prefix_kv, pk, pv, the gate): "
               "training moves the Aligner only through this gradient")


@explains("one backward through the layer with an Aligner prefix (tokens and gates requiring a gradient): "
          + NO_GRADIENT)
def prefix_gradient():
    """One backward through a layer with an Aligner prefix (N = 3, K < H): the tokens' and the gates'
    gradients against those of the formula written out (autograd through prefix_y)."""
    layer, x, tokens, gates = prefix_inputs(2, 3, 1)
    tokens, gates = tokens[0].requires_grad_(), gates[0].requires_grad_()  # (N, D), (H,)
    weights = torch.randn(2, 9, SMALL["dim"], generator=torch.Generator().manual_seed(5))  # (B, T, D)
    got, cos_sin = layer_run(layer, x, (tokens, gates))  # (B, T, D)
    if not got.requires_grad:
        return False, f"the Aligner's tokens and gates get no gradient (the output has none): {NO_GRADIENT}"
    mine = torch.autograd.grad((got * weights).sum(), (tokens, gates), allow_unused=True)
    lost = [name for name, g in zip(("tokens", "gates"), mine) if g is None or not g.abs().sum() > 0]
    if lost:
        return False, f"the Aligner's {' and '.join(lost)} get no gradient: {NO_GRADIENT}"
    q, k, v = heads(layer, x, cos_sin)
    want = layer.wo(causal_y(q, k, v) + prefix_y(layer, q, tokens[None], gates[None]))  # (B, T, D)
    theirs = torch.autograd.grad((want * weights).sum(), (tokens, gates))
    # a gradient sums over every position and row, then back through wk, wv (D) and the scores
    d = max(diff(g, r) / tol(r, 2 * 9 * SMALL["dim"], 2) for g, r in zip(mine, theirs))
    return verdict(d, "tokens' and gates' gradient (in tolerances)", "the gradient is not the formula's: "
                   "nothing on the prefix path may be detached, rounded or computed twice", 1.0)


def parameter_shapes(a) -> str:
    return ", ".join(f"{name} {tuple(p.shape)}" for name, p in a.named_parameters())


def aligner_parameters():
    """What an Aligner holds: LLaMA-2-7B's sizes give the paper's 5,056 (one token) and 41,920 (ten)
    parameters; per_layer=True gives (L - s, N, D) tokens; gates start at zero, tokens N(0, 1); all train."""
    from aligner import Aligner
    from model import ModelArgs

    torch.manual_seed(0)
    for n, count in ((1, 5056), (10, 41920)):
        a = Aligner(ModelArgs(), n)  # LLaMA-2-7B: D 4096, 32 layers, 32 heads, start layer 2
        if a.n_params() != count:
            return False, (f"{n} token(s) on LLaMA-2-7B: {a.n_params():,} parameters "
                           f"({parameter_shapes(a)}), the "
                           f"paper says {count:,}: tokens (N, D) = ({n}, 4096) and gates (L - s, H) = (30, "
                           "32)")
    per = Aligner(ModelArgs(dim=64, n_layers=6, n_heads=4), 3, start_layer=2, per_layer=True)
    if dict((k, tuple(p.shape)) for k, p in per.named_parameters()) != {"tokens": (4, 3, 64), "gates": (4,
                                                                                                        4)}:
        return False, ("per_layer=True on 6 layers from layer 2, 3 tokens, D 64, 4 heads: "
                       f"{parameter_shapes(per)}, "
                       f"expected tokens (L - s, N, D) = (4, 3, 64) and gates (L - s, H) = (4, 4)")
    if a.gates.abs().sum() != 0:
        return False, ("the gates must start at zero: a new Aligner is exactly the base model, and "
                       "learns how much to listen")
    std, mean = a.tokens.std().item(), a.tokens.mean().item()
    if not 0.95 < std < 1.05 or abs(mean) > 0.05:
        return False, (f"the tokens start with mean {mean:.3g} and std {std:.3g}: N(0, 1) (as "
                       "nn.Embedding): with "
                       f"zero gates, tokens that say nothing (zero, or tiny) get no gradient to grow from")
    frozen = [name for name, p in a.named_parameters() if not p.requires_grad]
    if frozen:
        return False, f"{', '.join(frozen)} do(es) not require a gradient: everything in an Aligner trains"
    return True, "5,056 and 41,920 parameters on LLaMA-2-7B; per-layer shapes; zero gates, N(0, 1) tokens"


def tokens_fault(a, layer: int, tokens, per_layer: bool) -> str:
    """What is wrong with the tokens a.prefix(layer) gave (layer >= start_layer), or ""."""
    i = layer - a.start_layer
    want = a.tokens[i] if per_layer else a.tokens  # (N, D)
    rows = a.tokens if per_layer else []
    other = next((j for j in range(len(rows)) if j != i and torch.equal(tokens, rows[j])), None)
    if other is not None:
        return (f"per_layer=True: prefix({layer}) gives tokens[{other}], another layer's row (the shape is "
                f"right, the values are not): expected tokens[{i}], the row of layer l is tokens[l - "
                "start_layer]")
    if tuple(tokens.shape) != tuple(want.shape) or not torch.equal(tokens, want):
        return (f"{'per_layer=True' if per_layer else 'shared tokens'}: prefix({layer}) gives tokens "
                f"{tuple(tokens.shape)}, expected (N, D) = {tuple(want.shape)}: " +
                ("tokens[layer - start_layer]" if per_layer else "the shared tokens, the same in every "
                                                                 "layer"))
    return ""


def prefix_fault(a, layer: int, per_layer: bool) -> str:
    """What is wrong with a.prefix(layer), or ""."""
    p, s = a.prefix(layer), a.start_layer
    if layer < s:
        return "" if p is None else f"prefix({layer}) is not None: no prefix below start_layer ({s})"
    if p is None:
        return f"prefix({layer}) is None: the first gated layer is start_layer ({s}) itself (layer >= s)"
    tokens, gate = p
    i = layer - s
    fault = tokens_fault(a, layer, tokens, per_layer)
    if fault:
        return fault
    if torch.equal(gate, torch.tanh(a.gates[i])):
        return f"prefix({layer}) gives tanh of the gate: the Aligner uses its gates raw"
    if not torch.equal(gate, a.gates[i]):
        row = next((j for j in range(len(a.gates)) if torch.equal(gate, a.gates[j])), None)
        return (f"prefix({layer}) gives gates[{row}], expected gates[{i}]: the row of layer l is l - "
                "start_layer"
                if row is not None else f"prefix({layer}) gives a gate that is not a row of gates: gates[l "
                                        "- s] as stored")
    return ""


@torch.no_grad()
@explains("prefix(layer) is None below start_layer, else (tokens, gates[layer - start_layer]), with "
          "per_layer: tokens[layer - start_layer]")
def aligner_prefix():
    """prefix(layer) for every layer of a 6-layer model from layer 2: None below, then the tokens (shared,
    or the layer's own with per_layer=True) and the layer's row of gates, as stored."""
    from aligner import Aligner
    from model import ModelArgs

    for start, per_layer in ((2, False), (2, True), (0, False), (3, True)):
        torch.manual_seed(0)
        a = Aligner(ModelArgs(dim=64, n_layers=6, n_heads=4), 3, start_layer=start, per_layer=per_layer)
        a.gates.normal_()
        fault = next((f for f in (prefix_fault(a, layer, per_layer) for layer in range(6)) if f), "")
        if fault and start != 2:
            return False, (f"start_layer {start} (start_layer 2 passed): {fault}: the start layer is "
                           "self.start_layer, not a number written in the code")
        if fault:
            return False, fault
    return True, ("None below start_layer (2, 0 and 3); the tokens (shared, or per layer) and gates[l - s] "
                  "from it on")


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


def full_loss(ours, a, batch):
    """The reference: cross-entropy of the full logits against the labels one position on, prompt and
    padding ignored (one mean over every labelled token of the batch)."""
    from data import IGNORE

    full = ours(batch.ids[:, :-1], a)  # (B, T-1, vocab)
    return F.cross_entropy(full.flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE)


def loss_fault(ours, a, batch, got: float, limit: float) -> str:
    """The known mistake whose loss is `got`, or ""."""
    from data import IGNORE

    want, labels, x = full_loss(ours, a, batch).item(), batch.labels, batch.ids
    kept = labels[:, 1:] != IGNORE  # (B, T-1)
    per_token = F.cross_entropy(ours(x[:, :-1], a).transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                reduction="none")  # (B, T-1)
    known = [(want * kept.sum().item(), "the loss is the sum over the labelled tokens: it is their mean"),
             (want * kept.sum().item() / kept.numel(), "the sum is divided by every position, prompt and "
                                                       "padding "
              "too: the loss is the mean over the labelled tokens only"),
             ((per_token.sum(1) / kept.sum(1)).mean().item(), "a mean of each row's mean: one mean over all "
                                                              "the "
              "batch's labelled tokens, so a row with more response tokens weighs more"),
             (F.cross_entropy(ours(x, a).flatten(0, 1), labels.flatten(), ignore_index=IGNORE).item(),
              "no shift: the logits at t predict the token at t + 1, so ids[:, :-1] pair with labels[:, 1:]"),
             (F.cross_entropy(ours(x[:, 1:], a).flatten(0, 1), labels[:, 1:].flatten(),
                              ignore_index=IGNORE).item(),
              "the model reads the token it is to predict: it reads ids[:, :-1], scored against labels[:, "
              "1:]"),
             (full_loss(ours, None, batch).item(), "the loss is the base model's: pass the Aligner to the "
                                                   "model")]
    return next((why for value, why in known if abs(got - value) <= limit), "")


def loss_check(padding: bool, label: str, hint: str):
    from train import sft_loss

    _, ours = tiny_pair()
    a, batch = nonzero_aligner(ours.args, 2), batch_of(padding=padding)
    with torch.no_grad():
        got, want = sft_loss(ours, a, batch)[0].item(), full_loss(ours, a, batch)
    d, limit = abs(got - want.item()), tol(want, 320, 2)  # the output projection's and the loss's sums
    if d <= limit:
        return True, f"{label}: |loss diff| {d:.1e} (tolerance {limit:.1e})"
    with torch.no_grad():
        why = loss_fault(ours, a, batch, got, limit) or hint
    return False, f"{label}: loss {got:.6g}, expected {want.item():.6g}: {why}"


def loss_without_padding():
    """sft_loss's value on 4 rows with as many labelled tokens each (the prompt ignored, no padding)
    against the cross-entropy of the full logits."""
    return loss_check(False, "no padding", "the cross-entropy of the logits at t against the labels at t + "
                                           "1, "
                      "over the labelled positions only")


def loss_with_padding():
    """The same with a padded row (fewer labelled tokens than the others)."""
    return loss_check(True, "a padded row", "without padding it agrees and with a padded row it does not: "
                                            "one "
                      "mean over every labelled token of the batch, padding and prompt left out")


@explains("after one backward the Aligner's gradients are those of the mean cross-entropy: the loss comes "
          "from the model's logits with the Aligner passed in, nothing detached or computed without grad")
def loss_gradient():
    """One backward of sft_loss: the Aligner's gradients (gates and tokens) against those of the
    cross-entropy of the full logits."""
    from train import sft_loss

    _, ours = tiny_pair()
    a, batch = nonzero_aligner(ours.args, 2), batch_of()
    sft_loss(ours, a, batch)[0].backward()
    got = [p.grad for p in (a.gates, a.tokens)]
    if any(g is None for g in got):
        return False, ("no gradient reached the Aligner after backward: the loss must come from the model "
                       "run "
                       "with the Aligner, nothing detached")
    a.zero_grad()
    full_loss(ours, a, batch).backward()
    # the gradient: every layer's backward sums, over all the batch's positions
    d = max(diff(g, p.grad) / tol(p.grad, 320, 2 * DEPTH) for g, p in zip(got, (a.gates, a.tokens)))
    return verdict(d, "gradient (in tolerances)", "the loss value is right and its gradient is not: nothing "
                   "may be detached, rounded or computed twice between the logits and the loss", 1.0)


def steps(ours, micro: int, n: int, lr: float, batch, sgd=False):
    """The Aligner after n optimizer steps of train.py's train_step over the batch's examples (one step
    of all of them), AdamW or plain SGD."""
    from data import Example, collate
    from support.parallel import Ranks
    from train import Run, TrainConfig, sft_loss, train_step

    a = nonzero_aligner(ours.args, 2)
    examples = [Example(i.tolist(), y.tolist(), []) for i, y in zip(batch.ids, batch.labels)]
    cfg = TrainConfig(data="x", batch_size=len(examples), micro_batch_size=micro, lr=lr, warmup_steps=0,
                      max_steps=n)
    optimizer = (torch.optim.SGD(a.parameters(), lr=cfg.lr) if sgd else
                 torch.optim.AdamW(a.parameters(), lr=cfg.lr, weight_decay=0.0))
    run = Run(model=ours, forward=ours, tok=type("Tok", (), {"pad_id": 0})(), aligner=a, loss_fn=sft_loss,
              collate=collate, optimizer=optimizer, train_set=examples, val=[],
              ranks=Ranks(0, 1, torch.device("cpu")), files=None, total=n, warmup=0)
    for _ in range(n):
        train_step(run, cfg)
    return a


@explains("each micro-batch's loss goes into backward divided by the number of micro-batches")
def accumulation_one_step():
    """One step of plain SGD (lr 1: the update is the gradient itself; Adam would hide a constant scale)
    over 6 examples as 3 micro-batches of 2, against the gradient of the mean loss over the 6."""
    from data import Batch, batch_indices
    from train import TrainConfig

    _, ours = tiny_pair()
    batch = batch_of(6, padding=False)
    a0, drawn = nonzero_aligner(ours.args, 2), batch_indices(6, 6, 0, TrainConfig(data="x").seed)  # step 0's
    full_loss(ours, a0, Batch(batch.ids[drawn], batch.labels[drawn])).backward()
    a = steps(ours, 2, 1, 1.0, batch, sgd=True)
    update, grad = (a0.gates - a.gates).detach(), a0.gates.grad  # (L - s, H) each
    d, limit = diff(update, grad), tol(grad, 320, 2 * DEPTH)
    if d <= limit:
        return True, f"max |update - gradient of the mean| {d:.1e} (tolerance {limit:.1e})"
    ratio = ((update * grad).sum() / (grad * grad).sum()).item()
    return False, (f"one SGD step moved the gates by {ratio:.3g} times the gradient of the mean loss (3 "
                   f"micro-batches of 2): divide each micro-batch's loss by the number of micro-batches, "
                   "batch_size / micro_batch_size = 3, before backward: the gradients then add up to the "
                   "mean's")


def accumulation_equals_one_batch():
    """Three AdamW steps of 4 examples as 2 micro-batches of 2 against 1 micro-batch of 4 (each example
    with as many labelled tokens): the same Aligner."""
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
def merge_check(ours, label: str, hint: str):
    """A one-token Aligner folded into wo biases (merged_bias) against base + Aligner."""
    from dataclasses import replace

    from aligner import merged_bias
    from model import Transformer

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
    d, limit = diff(merged(x), want), tol(want)
    if d <= limit:
        return True, f"{label}: max |logit diff| {d:.1e} (tolerance {limit:.1e})"
    return False, f"{label}: max |logit diff| {d:.3g}, expected <= {limit:.2g}: {hint}"


@torch.no_grad()
@explains("merged_bias(a, layer, wv (K*E, D), wo (D, H*E), args) returns (D,)")
def merge_equal_heads():
    """The merge with as many key/value heads as query heads (K = H): the algebra before the head order."""
    return merge_check(random_model(4), "K = H", "with one token the prefix softmax is 1, so head h adds "
                       "g[h] * (wv p) at every position; wo (D, H * E) maps that (H * E,) vector to the "
                       "bias: "
                       "b = wo (g * wv p)")


@torch.no_grad()
@explains("merged_bias(a, layer, wv (K*E, D), wo (D, H*E), args) returns (D,)")
def merge_equals_base_plus_aligner():
    """The merge on transformers' grouped-query tiny model (K = 2 < H = 4), against base + Aligner."""
    return merge_check(tiny_pair()[1], "K < H", "K = H passes and K < H does not: head h = k * G + group "
                                                "gets "
                       "wv p of key/value head k: pv (K, 1, E) times the gate viewed as (K, G, 1), "
                       "flattened in "
                       "head order")


@torch.no_grad()
@explains("merged_bias computes in float32 whatever the weights' dtype (.float() on wv, the token, the gate "
          "and wo) and returns (D,) float32")
def merge_in_bfloat16():
    """merged_bias of bfloat16 weights (a model loaded in bfloat16): a float32 bias, equal to the same
    algebra on those weights in float32."""
    from aligner import merged_bias

    model = random_model(2)
    a, args, attention = nonzero_aligner(model.args, 1), model.args, model.layers[2].attention
    wv, wo = attention.wv.weight.bfloat16(), attention.wo.weight.bfloat16()  # (K*E, D), (D, H*E)
    got = merged_bias(a, 2, wv, wo, args)  # (D,)
    pv = (wv.float() @ a.tokens[0]).view(args.n_kv_heads, 1, -1)  # (K, 1, E)
    want = wo.float() @ (a.gates[0].view(args.n_kv_heads, -1, 1) * pv).reshape(-1)  # (D,)
    if got.dtype != torch.float32:
        return False, f"the bias is {got.dtype}: merged_bias works and returns in float32"
    return verdict(diff(got, want), "bias", "float32 throughout", tol(want, 64, 2))


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
@explains("sequence_logprob(model, aligner, ids, labels) takes ids and labels already paired (B, T) and "
          "returns (B,)")
def sequence_logprob_sums_each_row():
    """sequence_logprob of 4 rows (one padded) against log p summed per row from the full logits."""
    from dpo import sequence_logprob

    _, ours = tiny_pair()
    a, batch = nonzero_aligner(ours.args, 2, seed=1), batch_of()
    got = sequence_logprob(ours, a, batch.ids[:, :-1], batch.labels[:, 1:])  # (B,)
    want = torch.stack([direct_logprob(ours, a, i, y) for i, y in zip(batch.ids, batch.labels)])  # (B,)
    if tuple(got.shape) != (4,):
        return False, f"sequence_logprob gave {tuple(got.shape)} for 4 rows: one sum per row, (B,)"
    d, limit = diff(got, want), tol(want, 320, DEPTH + 1)
    counts = (batch.labels[:, 1:] != -100).sum(1)  # (B,)
    if d > limit and diff(got * counts, want) <= limit * counts.max().item():
        return False, f"max |log p diff| {d:.3g}: a mean over each row's tokens: DPO sums them"
    return verdict(d, "log p", "log_softmax of the kept positions' logits, the label's entry gathered, "
                               "summed "
                   "per row", limit)


def dpo_fault(got: float, lp: list, limit: float) -> str:
    """The known mistake whose loss is `got`, from the four log-probabilities per pair, or ""."""
    pc, pr, rc, rr = lp

    def loss(beta=0.1, swap=False, ref=True, interleaved=False):
        c, r, rc_, rr_ = (pr, pc, rr, rc) if swap else (pc, pr, rc, rr)
        if interleaved:  # rows 0, 2, ... against rows 1, 3, ... of [chosen..., rejected...]
            p_, r_ = torch.cat([pc, pr]), torch.cat([rc, rr])  # (2B,) each
            c, r, rc_, rr_ = p_[0::2], p_[1::2], r_[0::2], r_[1::2]
        margin = (c - r) - ((rc_ - rr_) if ref else 0)
        return -F.logsigmoid(beta * margin).mean().item()

    known = [(loss(swap=True), "chosen and rejected are swapped: a batch of collate_pairs holds the B "
                               "chosen rows "
              "first, then the B rejected"),
             (loss(beta=1.0), "beta is left out: -logsigmoid(beta * margin)"),
             (loss(ref=False), "the margin has no reference term: subtract the reference's (ref_c - ref_r)"),
             (-loss(), "the sign: the loss is -logsigmoid(beta * margin), which falls as the margin grows"),
             (2 * loss(), "the loss is twice the expected one, a sum over the pairs: it is their mean"),
             (0.1 * loss(beta=1.0), "beta multiplies logsigmoid's result: it multiplies the margin inside, "
              "-logsigmoid(beta * margin)"),
             (-0.1 * loss(beta=1.0), "the sign, and beta outside logsigmoid: -logsigmoid(beta * margin)"),
             (-loss(swap=True), "the sign is inside logsigmoid: the loss is -logsigmoid(beta * margin)"),
             (loss(interleaved=True), "the pairs are read interleaved (rows 0, 2, ... against 1, 3, ...): a "
              "batch of collate_pairs holds the B chosen rows first, then the B rejected: [:b] against [b:]")]
    # the policy as its own reference: every margin exactly 0 (the same sums twice), a loss of log 2 up
    # to the rounding of logsigmoid alone (a margin off by a little stays inside the limit above)
    if abs(got - math.log(2)) <= tol(None, 2, 2, magnitude=math.log(2)):
        return ("the loss is log 2: the reference log-probabilities come from the policy itself "
                "(self.reference is the reference Aligner)")
    return next((why for value, why in known if abs(got - value) <= limit), "")


def dpo_formula(ours, policy, reference, batch, beta=0.1):
    """(-logsigmoid(beta * margin) averaged over the pairs, written out; the four log-probabilities per
    pair [pi_c, pi_r, ref_c, ref_r], (2,) each; the tolerance): reference None is the base model."""
    lp = [torch.stack([direct_logprob(ours, m, batch.ids[i], batch.labels[i]) for i in rows])  # (2,) each
          for m in (policy, reference) for rows in ((0, 1), (2, 3))]
    want = -F.logsigmoid(beta * ((lp[0] - lp[1]) - (lp[2] - lp[3]))).mean().item()
    # beta times a difference of four log-probabilities, each a sum through the model (as
    # sequence_logprob_sums_each_row's tolerance); |d logsigmoid| <= 1, so the loss moves at most that
    limit = tol(None, 320, DEPTH + 1, magnitude=beta * 4 * max(v.abs().max().item() for v in lp))
    return want, lp, limit


@torch.no_grad()
@explains("DPOLoss(reference, beta)(model, aligner, batch) returns (loss, statistics)")
def dpo_equals_the_formula():
    """-logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))) written out per pair, beta 0.1, and
    exactly log 2 when the policy is the reference."""
    from dpo import DPOLoss

    _, ours = tiny_pair()
    # seeds whose margins differ from pair to pair: pairs read interleaved (rows 0, 2 and 1, 3) move the
    # loss some 17 times the tolerance (seeds 1, 2 gave margins so alike that they stayed inside it)
    policy, reference = nonzero_aligner(ours.args, 2, seed=4), nonzero_aligner(ours.args, 2, seed=5)
    batch = pairs_batch()  # chosen rows 0, 1; rejected rows 2, 3
    got = DPOLoss(reference, 0.1)(ours, policy, batch)[0].item()
    want, lp, limit = dpo_formula(ours, policy, reference, batch)
    if abs(got - want) > limit:
        why = dpo_fault(got, lp, limit) or ("log-probabilities summed over the response tokens of each "
                                            "sequence "
                                           "(labels at t + 1 for the logits at t), beta times the "
                                           "difference of margins")
        return False, f"loss {got:.6g}, expected {want:.6g}: {why}"
    same, _ = DPOLoss(policy, 0.1)(ours, policy, batch)
    return verdict(abs(same.item() - math.log(2)), "loss - log 2 (policy = reference)",
                   "with the policy equal to the reference every margin is 0 and the loss log 2",
                   tol(None, 2, 2, magnitude=math.log(2)))


@torch.no_grad()
@explains("DPOLoss(None, beta) (train.py --dpo without --init): the reference is the base model, "
          "sequence_logprob(model, None, ...)")
def dpo_reference_none_is_the_base():
    """DPOLoss(None, 0.1), as train.py --dpo without --init builds it: the reference log-probabilities
    are the base model's (no Aligner), against the formula written out with them."""
    from dpo import DPOLoss

    _, ours = tiny_pair()
    policy, batch = nonzero_aligner(ours.args, 2, seed=4), pairs_batch()
    got = DPOLoss(None, 0.1)(ours, policy, batch)[0].item()
    want, _, limit = dpo_formula(ours, policy, None, batch)
    if abs(got - want) <= limit:
        return True, f"reference None: |loss diff| {abs(got - want):.1e} (tolerance {limit:.1e})"
    log2 = abs(got - math.log(2)) <= tol(None, 2, 2, magnitude=math.log(2))  # the policy as reference
    why = ("the loss is log 2: with reference None the reference log-probabilities came from the policy: "
           "None is the base model without an Aligner, sequence_logprob(model, None, ids, labels)"
           if log2 else "with reference None the reference is the base model, "
           "sequence_logprob(model, None, ids, labels): neither the policy nor a new Aligner")
    return False, f"reference None: loss {got:.6g}, expected {want:.6g}: {why}"


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


def grade(name: str):
    """(passed, what was measured) of one grader on the copy first on the import path."""
    try:
        return globals()[name]()
    except NotImplementedError as e:
        return False, f"not written yet ({e})"
    except Exception as e:  # the student's code may fail in any way: say where
        where = traceback.extract_tb(e.__traceback__)[-1]
        return False, f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"


AFTER = ("(after an earlier FAIL: what follows assumes the checks above passed, and one did not: fix "
         "the first FAIL first) ")


def main(student: str, names: list) -> int:
    """Run the graders on the student's folder; print a line each; the number that failed."""
    sys.path.insert(0, str(Path(student).resolve()))
    quiet()
    failed = 0
    for name in names:
        ok, detail = grade(name)
        if not ok and failed and not detail.startswith("not written yet"):
            detail = f"{AFTER}{detail}"
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
