"""The lessons: for each, its page, the code a student writes (found by name, never by line number)
and the graders that check it. lessons.py reads this file.

A Blank names a function of a primer file ("Class.method" or "function"); with `start`, only the
block from the line holding `start` up to (not including) the first later line that begins with
`end` (empty `end`: the end of the function); without, the whole body below the docstring. The
block becomes `stub`, indented as the block was: a comment saying what to write, and a raise.
`region` finds that block in a file's source; lessons.py blanks it, lessons/mistakes.py edits inside it.
Not run on its own. Read next: graders.py.
"""
import ast
from typing import NamedTuple


class Blank(NamedTuple):
    file: str
    function: str
    stub: str
    start: str = ""
    end: str = ""


class Lesson(NamedTuple):
    number: int
    title: str
    page: str  # lessons/NAME.md
    blanks: list
    graders: list  # function names in graders.py


def find_function(tree, qualname: str):
    """The FunctionDef of `Class.method` or `function` in a module's tree."""
    node, parts = tree, qualname.split(".")
    for part in parts:
        kinds = (ast.FunctionDef, ast.ClassDef)
        node = next((n for n in node.body if isinstance(n, kinds) and n.name == part), None)
        if node is None:
            raise LookupError(f"no {qualname}")
    return node


def region(source: str, b: Blank, tree=None) -> tuple:
    """(first, last): the 0-based lines, end exclusive, of the block that `b` names in `source`."""
    lines = source.splitlines()
    fn = find_function(tree or ast.parse(source), b.function)
    body = fn.body[1:] if ast.get_docstring(fn) else fn.body
    first, last = body[0].lineno - 1, fn.end_lineno
    if b.start:
        first = next(i for i in range(first, last) if b.start in lines[i])
        last = next((i for i in range(first + 1, last) if lines[i].strip().startswith(b.end)), last) \
            if b.end else last
    return first, last


def todo(number: int, what: str) -> str:
    return f'raise NotImplementedError("lesson {number}: {what}")'


LESSONS = [
    Lesson(1, "Causal attention with grouped-query heads", "1-attention.md", [
        Blank("model.py", "Attention.forward", start="# causal attention;", end="# Aligner:",
              stub="# causal attention: y (b, t, k, g, e) from xq (b, t, k, g, e), xk and xv (b, s, k, e)\n"
                   "# and mask (b, 1, 1, t, s), 0 where key s is visible from query t, else -inf\n"
                   + todo(1, "scores, a causal softmax in fp32, and the weighted sum of the values"))],
           ["attention_equal_heads", "attention_grouped_query", "attention_with_cache",
            "attention_in_bfloat16",
            "logits_equal_transformers"]),
    Lesson(2, "RoPE and the KV cache", "2-rope-and-cache.md", [
        Blank("model.py", "rope",
              stub="# with args whose rope_factor is not 1, the frequencies go through scaled_frequencies\n"
                   + todo(2, "cos and signed sin of pos * theta^(-2i/E), (B, T, 1, E) each")),
        Blank("model.py", "KVCache.update",
              stub=todo(2, "write xk, xv at positions pos; return every cached k, v"))],
           ["rope_rotates_pairs", "rope_scales_long_context", "kv_cache_keeps_every_column",
            "logits_equal_transformers", "cached_decoding_equals_recomputation"]),
    Lesson(3, "The Aligner path in attention", "3-aligner-attention.md", [
        Blank("model.py", "Attention.forward", start="# Aligner: the shared tokens", end="return self.wo(",
              stub="if prefix is not None:  # Aligner: the shared tokens, a softmax of their own, the gate\n"
                   "    " + todo(3, "prefix keys/values, their own softmax, gated per head, added to y"))],
           ["zero_gates_add_nothing", "prefix_one_token", "prefix_several_tokens", "prefix_grouped_query",
            "prefix_per_row", "prefix_with_cache", "prefix_in_bfloat16", "aligner_equals_peft",
            "prefix_gradient"]),
    Lesson(4, "The Aligner module", "4-aligner-module.md", [
        Blank("aligner.py", "Aligner.__init__", start="n_gated = args.n_layers - start_layer",
              stub=todo(4, "self.tokens (N, D) or (L - s, N, D), N(0, 1); self.gates (L - s, H), zero")),
        Blank("aligner.py", "Aligner.prefix",
              stub=todo(4, "(tokens, gate) of a layer, or None below start_layer"))],
           ["aligner_parameters", "aligner_prefix", "official_files_load_and_run", "zero_gates_add_nothing",
            "aligner_equals_peft"]),
    Lesson(5, "The loss on the response, and gradient accumulation", "5-loss.md", [
        Blank("train.py", "sft_loss",
              stub=todo(5, "cross-entropy of the labelled positions; return (loss, {})")),
        Blank("train.py", "train_step", start="(loss / accum).backward()", end="loss_sum, n_seen =",
              stub=todo(5, "backpropagate this micro-batch's share of the step's mean loss"))],
           ["loss_without_padding", "loss_with_padding", "loss_gradient", "accumulation_one_step",
            "accumulation_equals_one_batch", "training_changes_only_the_aligner"]),
    Lesson(6, "Merging a one-token Aligner, from the algebra", "6-merge.md", [
        Blank("aligner.py", "merged_bias", stub=todo(6, "b_l = wo_l (g_l * wv_l p), (D,) in float32"))],
           ["merge_equal_heads", "merge_equals_base_plus_aligner", "merge_in_bfloat16"]),
    Lesson(7, "The DPO loss", "7-dpo.md", [
        Blank("dpo.py", "sequence_logprob",
              stub=todo(7, "sum of log p(label) over the labelled tokens, (B,)")),
        Blank("dpo.py", "DPOLoss.__call__",
              stub=todo(7, "-logsigmoid(beta * margin), with the reference Aligner"))],
           ["sequence_logprob_sums_each_row", "dpo_equals_the_formula", "dpo_reference_none_is_the_base",
            "dpo_keeps_one_base_model"]),
]


HINTS = {  # python lessons.py hint N --level L: 1 the idea, 2 the shapes, 3 the einsum strings (or the calls)
    1: ["Each query t mixes the values of the keys s it may see, weighted by a softmax over s of q . k / "
        "sqrt(E); "
        "the mask (0 or -inf) goes into the scores before the softmax. Grouped-query: the g query heads of a "
        "key/value head share its key and its value.",
        "xq (b, t, k, g, e); xk, xv (b, s, k, e); scores and att (b, k, g, t, s); the mask (b, 1, 1, t, s) "
        "broadcasts onto them; y (b, t, k, g, e). The softmax runs over the last axis in float32 and comes "
        "back "
        "to xq's dtype.",
        'scores: "btkge,bske->bkgts" (xq, xk), divided by sqrt(e); att = (scores.float() + '
        'mask).softmax(-1), '
        'back with .type_as(xq); y: "bkgts,bske->btkge" (att, xv).'],
    2: ["RoPE turns each pair (x0, x1) = (x[2i], x[2i+1]) of a head by pos * theta^(-2i/E); rope returns "
        "cos and "
        "a signed sin laid out so that apply_rope's x * cos + swapped(x) * sin is that rotation. The cache "
        "keeps "
        "every key and value written so far and returns all its columns: the mask hides the rest.",
        "inv_freq (E/2,); angle = pos (B, T) times it: (B, T, E/2); cos, sin (B, T, E), then (B, T, 1, E). "
        "update: xk (B, T, K, E) into k (B_max, S, K, E) at columns pos, (T,) for every row or (B, T) per "
        "row; "
        "return the first B rows, (B, S, K, E).",
        "cos: angle.cos().repeat_interleave(2, -1); sin: torch.stack((-angle.sin(), angle.sin()), "
        "-1).flatten(-2); "
        "rows: slice(b) for pos (T,), torch.arange(b)[:, None] for pos (B, T); self.k[rows, pos] = xk."],
    3: ["The prefix tokens P go through this layer's wk, wv (prefix_kv: no norm, no RoPE); every query "
        "attends "
        "to them with a softmax of its own, not joined to the causal one; the result, scaled by its head's "
        "gate, "
        "is added to y before wo. With a cache, pk and pv are cache.aligner_kv.",
        "pk, pv (n, k, e), or (b, n, k, e) with one Aligner per row: expand both to (b, n, k, e); p_scores "
        "and "
        "p_att (b, k, g, t, n), the softmax over n in float32; py (b, t, k, g, e); the gate (h,) or (b, h): "
        "expand to (b, h), view as (b, 1, k, g, 1).",
        'p_scores: "btkge,bnke->bkgtn" (xq, pk), divided by sqrt(e); py: "bkgtn,bnke->btkge" (p_att, pv); '
        "y = y + gate.to(y.dtype).expand(b, H).view(b, 1, k, g, 1) * py."],
    4: ["Everything that trains: tokens N(0, 1) (as nn.Embedding), shared (N, D) or one set per gated layer; "
        "gates zero, one per head per gated layer. prefix(layer) is None below the start layer, else the "
        "tokens "
        "and the layer's row of gates, used raw.",
        "tokens (N, D), or (L - s, N, D) with per_layer; gates (L - s, H); prefix(l): i = l - start_layer, "
        "tokens[i] with per_layer, gates[i] (H,).",
        "nn.Parameter(torch.randn(shape)); nn.Parameter(torch.zeros(n_gated, args.n_heads)); "
        "prefix: None if layer < self.start_layer, else (tokens, self.gates[layer - self.start_layer])."],
    5: ["The logits at t predict the token at t + 1: pair ids[:, :-1] with labels[:, 1:]; one mean of the "
        "cross-entropy over the labelled positions of the whole batch. With accumulation, each micro-batch's "
        "loss is divided by the number of micro-batches, so the gradients add up to those of the step's "
        "mean.",
        "labels (B, T-1); keep (B, T-1) booleans; model(..., keep=keep) gives (n, vocab) for the n kept "
        "positions; labels[keep] (n,). accum = batch_size // micro_batch_size.",
        "F.cross_entropy(logits (n, vocab), labels[keep] (n,)): its default mean is over the n; "
        "(loss / accum).backward()."],
    6: ["With one token the prefix softmax gives it weight 1 for every query, so each head adds the same "
        "vector "
        "g[h] * (wv p) at every position: after wo, a constant bias.",
        "wv (K*E, D) @ p (D,) -> (K*E,) -> (K, 1, E); the gate (H,) -> (K, G, 1); their product (K, G, E) -> "
        "(H*E,); wo (D, H*E) @ it -> (D,); all in float32.",
        "(wv.float() @ tokens[0].float()).view(K, 1, E); gate.float().view(K, G, 1) * pv; "
        "wo.float() @ per_head.reshape(-1)."],
    7: ["pi: the summed log-probabilities of a response's tokens under the policy Aligner; ref: the same "
        "under "
        "the frozen reference Aligner on the same base; loss -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - "
        "ref_r))), "
        "the B chosen rows first, then the B rejected.",
        "ids, labels (2B, T), already paired; keep (2B, T); model(ids, aligner, keep=keep).log_softmax(-1) "
        "(n, vocab); the label's entry (n,); back to (2B, T) and summed: (2B,); b = 2B // 2.",
        "logp.gather(-1, labels[keep][:, None])[:, 0]; torch.zeros(keep.shape).masked_scatter(keep, "
        "picked).sum(-1); "
        "margin = (policy[:b] - policy[b:]) - (ref[:b] - ref[b:]); -F.logsigmoid(beta * margin).mean()."],
}
