"""The lessons: for each, its page, the code a student writes (found by name, never by line number)
and the graders that check it. lessons.py reads this file.

A Blank names a function of a primer file ("Class.method" or "function"); with `start`, only the
block from the line holding `start` up to (not including) the first later line that begins with
`end` (empty `end`: the end of the function); without, the whole body below the docstring. The
block becomes `stub`, indented as the block was: a comment saying what to write, and a raise.
Not run on its own. Read next: graders.py.
"""
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


def todo(number: int, what: str) -> str:
    return f'raise NotImplementedError("lesson {number}: {what}")'


LESSONS = [
    Lesson(1, "Causal attention with grouped-query heads", "1-attention.md", [
        Blank("model.py", "Attention.forward", start="# causal attention;", end="# Aligner:",
              stub="# causal attention: y (b, t, k, g, e) from xq (b, t, k, g, e), xk and xv (b, s, k, e)\n"
                   "# and mask (b, 1, 1, t, s), 0 where key s is visible from query t, else -inf\n"
                   + todo(1, "scores, a causal softmax in fp32, and the weighted sum of the values"))],
           ["attention_equals_sdpa", "logits_equal_transformers"]),
    Lesson(2, "RoPE and the KV cache", "2-rope-and-cache.md", [
        Blank("model.py", "rope",
              stub="# with args whose rope_factor is not 1, the frequencies go through scaled_frequencies\n"
                   + todo(2, "cos and signed sin of pos * theta^(-2i/E), (B, T, 1, E) each")),
        Blank("model.py", "KVCache.update",
              stub=todo(2, "write xk, xv at positions pos; return every cached k, v"))],
           ["logits_equal_transformers", "cached_decoding_equals_recomputation"]),
    Lesson(3, "The Aligner path in attention", "3-aligner-attention.md", [
        Blank("model.py", "Attention.forward", start="# Aligner: the shared tokens", end="return self.wo(",
              stub="if prefix is not None:  # Aligner: the shared tokens, a softmax of their own, the gate\n"
                   "    " + todo(3, "prefix keys/values, their own softmax, gated per head, added to y"))],
           ["zero_gates_add_nothing", "aligner_equals_peft"]),
    Lesson(4, "The Aligner module", "4-aligner-module.md", [
        Blank("aligner.py", "Aligner.__init__", start="n_gated = args.n_layers - start_layer",
              stub=todo(4, "self.tokens (N, D) or (L - s, N, D), N(0, 1); self.gates (L - s, H), zero")),
        Blank("aligner.py", "Aligner.prefix",
              stub=todo(4, "(tokens, gate) of a layer, or None below start_layer"))],
           ["official_files_load_and_run", "zero_gates_add_nothing", "aligner_equals_peft"]),
    Lesson(5, "The loss on the response, and gradient accumulation", "5-loss.md", [
        Blank("train.py", "sft_loss",
              stub=todo(5, "cross-entropy of the labelled positions; return (loss, {})")),
        Blank("train.py", "train_step", start="(loss / accum).backward()", end="loss_sum, n_seen =",
              stub=todo(5, "backpropagate this micro-batch's share of the step's mean loss"))],
           ["loss_equals_full_logits", "accumulation_equals_one_batch", "training_changes_only_the_aligner"]),
    Lesson(6, "Merging a one-token Aligner, from the algebra", "6-merge.md", [
        Blank("aligner.py", "merged_bias", stub=todo(6, "b_l = wo_l (g_l * wv_l p), (D,) in float32"))],
           ["merge_equals_base_plus_aligner"]),
    Lesson(7, "The DPO loss", "7-dpo.md", [
        Blank("dpo.py", "sequence_logprob",
              stub=todo(7, "sum of log p(label) over the labelled tokens, (B,)")),
        Blank("dpo.py", "DPOLoss.__call__",
              stub=todo(7, "-logsigmoid(beta * margin), with the reference Aligner"))],
           ["dpo_equals_the_formula", "dpo_keeps_one_base_model"]),
]
