"""The catalog of wrong answers: for each lesson, mistakes a student plausibly makes, each written as a
small edit of the right answer (the primer's own code), with the grader that must fail FIRST and the
words its message must hold. A grader that passes one of these is a bug in the course.

    python lessons.py catalog            # every entry on a copy of the primer: caught, by which grader
    python lessons.py catalog 3 5        # lessons 3 and 5 only

Each edit replaces `old` by `new` inside the lesson's blank (lessons/catalog.py: the function, and the
block between its markers), where `old` must occur exactly once: if the primer changes so that it
does not, `apply` stops with the entry's name, not a silent pass. Used by lessons/trial.py and the
tests (tests/test_catalog.py). Not run on its own. Read next: trial.py.
"""
import ast
from typing import NamedTuple

from catalog import LESSONS, region


class Mistake(NamedTuple):
    lesson: int
    name: str  # the mistake, named as a teacher would
    file: str  # the primer file it edits
    edits: list  # [(old, new)]: `old` occurs once in the lesson's blank of `file`
    first: str  # the grader that must fail first
    words: str  # what that grader's message must say


class AnchorLost(LookupError):
    """An entry's text is no longer in the lesson's block: the primer changed under the catalog."""


def blocks(source: str, lesson: int, file: str) -> list:
    """[(first line, last line)] (0-based, end exclusive) of the lesson's blanks in `file`."""
    tree = ast.parse(source)
    return [region(source, b, tree) for b in LESSONS[lesson - 1].blanks if b.file == file]


def apply(source: str, m: Mistake) -> str:
    """`source` (the primer file m.file) with the mistake written in; AnchorLost if an edit's text is
    not exactly once inside the lesson's blank."""
    for old, new in m.edits:
        lines = source.splitlines(keepends=True)
        spans = [(sum(map(len, lines[:a])), sum(map(len, lines[:b]))) for a, b in blocks(source, m.lesson,
                                                                                         m.file)]
        found = [(a + i, b) for a, b in spans for i in [source[a:b].find(old)] if i >= 0]
        if len(found) != 1 or source[found[0][0]: found[0][1]].count(old) != 1:
            raise AnchorLost(f"lessons/mistakes.py: {m.name!r} (lesson {m.lesson}): {old!r} is not exactly "
                             "once in "
                             f"the lesson's block of {m.file}: the primer changed; rewrite this entry")
        at = found[0][0]
        source = source[:at] + new + source[at + len(old):]
    return source


I12 = " " * 12  # the indent of Attention.forward's inner blocks


def lesson1() -> list:
    att = "att = (scores.float() + mask).softmax(-1).type_as(xq)"
    y = 'y = torch.einsum("bkgts,bske->btkge", att, xv)'
    return [
        Mistake(1, "scores not scaled", "model.py", [("xq, xk) / math.sqrt(e)", "xq, xk)")],
                "attention_equal_heads", "not scaled"),
        Mistake(1, "scores divided by E, not sqrt(E)", "model.py", 
                [("xq, xk) / math.sqrt(e)", "xq, xk) / e")],
                "attention_equal_heads", "divided by E"),
        Mistake(1, "scores divided by sqrt(number of heads)", "model.py",
                [("xq, xk) / math.sqrt(e)", "xq, xk) / math.sqrt(self.n_heads)")], "attention_equal_heads",
                    "sqrt(H)"),
        Mistake(1, "no causal mask", "model.py", [(att, "att = scores.float().softmax(-1).type_as(xq)")],
                "attention_equal_heads", "every query sees every key"),
        Mistake(1, "mask added after the softmax", "model.py",
                [(att, "att = (scores.float().softmax(-1) + mask).type_as(xq)")], "attention_equal_heads",
                    "inf or NaN"),
        Mistake(1, "softmax over the queries", "model.py", [(att, att.replace("softmax(-1)", "softmax(-2)"))],
                "attention_equal_heads", "over the queries"),
        Mistake(1, "weights times the keys", "model.py", [(y, y.replace("att, xv", "att, xk"))],
                "attention_equal_heads", "multiply the keys"),
        Mistake(1, "output heads in group-major order", "model.py",
                [(y, 'y = torch.einsum("bkgts,bske->btgke", att, xv).reshape(b, t, k_heads, g, e)')],
                "attention_grouped_query", "K = H passes"),
        Mistake(1, "a causal mask built from t, not the one passed in", "model.py",
                [(att, 'att = (scores.float() + torch.full((t, t), '
                       'float("-inf")).triu(1)).softmax(-1).type_as(xq)')],
                "attention_with_cache", "the mask passed in"),
        Mistake(1, "softmax weights left in float32", "model.py", [(att, att.replace(".type_as(xq)", ""))],
                "attention_in_bfloat16", "type_as(xq)"),
    ]


def lesson2() -> list:
    sin = "sin = torch.stack((-angle.sin(), angle.sin()), -1).flatten(-2)"
    write = "self.k[rows, pos] = xk"
    return [
        Mistake(2, "pairs turned the wrong way", "model.py", [(sin, sin.replace("(-angle.sin(), angle.sin())",
                                                                                "(angle.sin(), "
                                                                                "-angle.sin())"))],
                "rope_rotates_pairs", "wrong way"),
        Mistake(2, "frequencies theta^(-i/E)", "model.py",
                [("torch.arange(0, head_dim, 2, device=pos.device)", "torch.arange(0, head_dim // 2, "
                                                                     "device=pos.device)")],
                "rope_rotates_pairs", "theta^(-2i/E)"),
        Mistake(2, "cos and sin as two halves (the Hugging Face layout)", "model.py",
                [("cos = angle.cos().repeat_interleave(2, -1)", "cos = torch.cat((angle.cos(), "
                                                                "angle.cos()), -1)"),
                 (sin, "sin = torch.cat((-angle.sin(), angle.sin()), -1)")], "rope_rotates_pairs",
                     "in place"),
        Mistake(2, "rope_factor ignored (LLaMA-3.1)", "model.py",
                [("    if args is not None and args.rope_factor != 1:\n"
                  "        inv_freq = scaled_frequencies(inv_freq, args)  # (E/2,)\n", "")],
                "rope_scales_long_context", "those of rope_factor 1"),
        Mistake(2, "update returns only the new keys", "model.py", [("return self.k[:b], self.v[:b]",
                                                                     "return xk, xv")],
                "kv_cache_keeps_every_column", "every column"),
        Mistake(2, "update returns every row of the buffers", "model.py",
                [("return self.k[:b], self.v[:b]", "return self.k, self.v")], "kv_cache_keeps_every_column",
                "every column S of the first B rows"),
        Mistake(2, "per-row positions ignored", "model.py",
                [("rows = slice(b) if pos.dim() == 1 else torch.arange(b, device=pos.device)[:, None]",
                  "rows = slice(b)")], "kv_cache_keeps_every_column", "pos[r]"),
        Mistake(2, "written from column 0, not at pos", "model.py",
                [(write, "self.k[rows, : xk.shape[1]] = xk"),
                 ("self.v[rows, pos] = xv", "self.v[rows, : xv.shape[1]] = xv")],
                "kv_cache_keeps_every_column", "at columns pos"),
    ]


def lesson3() -> list:
    scores = 'p_scores = torch.einsum("btkge,bnke->bkgtn", xq, pk) / math.sqrt(e)'
    att = "p_att = p_scores.float().softmax(-1).type_as(xq)"
    gate = "gate.to(y.dtype).expand(b, self.n_heads).view(b, 1, k_heads, g, 1) * py"
    expand = "pk, pv = pk.expand(b, *pk.shape[-3:]), pv.expand(b, *pv.shape[-3:])"
    return [
        Mistake(3, "gate inside the softmax", "model.py",
                [(scores, "p_scores = gate.to(xq.dtype).expand(b, self.n_heads).view(b, k_heads, g, 1, 1) * "
                          'torch.einsum("btkge,bnke->bkgtn", xq, pk) / math.sqrt(e)'), ("y = y + " + gate,
                                                                                        "y = y + py")],
                "zero_gates_add_nothing", "not the scores inside it"),
        Mistake(3, "gate left out", "model.py", [("y = y + " + gate, "y = y + py")], "zero_gates_add_nothing",
                "not left out"),
        Mistake(3, "RoPE on the prefix keys", "model.py",
                [(expand, expand + "\n" + I12 + "pk = apply_rope(pk, rope[0][:, :pk.shape[1]], rope[1][:, "
                                                ":pk.shape[1]])")],
                "prefix_several_tokens", "RoPE"),
        Mistake(3, "prefix scores not scaled", "model.py", [(scores, scores.replace(" / math.sqrt(e)", ""))],
                "prefix_several_tokens", "not scaled"),
        Mistake(3, "prefix softmax over the queries", "model.py", [(att, att.replace("softmax(-1)",
                                                                                     "softmax(-2)"))],
                "prefix_one_token", "over the queries"),
        Mistake(3, "prefix weights times pk", "model.py",
                [('py = torch.einsum("bkgtn,bnke->btkge", p_att, pv)',
                  'py = torch.einsum("bkgtn,bnke->btkge", p_att, pk)')],
                "prefix_one_token", "multiply pk"),
        Mistake(3, "one softmax over the causal keys and the prefix", "model.py",
                [(att, "p_att = torch.cat([scores.float() + mask, p_scores.float()], -1).softmax(-1)"
                       "[..., -pk.shape[1]:].type_as(xq)")], "prefix_one_token", "not joined"),
        Mistake(3, "gates in group-major head order", "model.py",
                [(gate, gate.replace(".view(b, 1, k_heads, g, 1)", ".view(b, 1, g, k_heads, 1).transpose(2, "
                                                                   "3)"))],
                "prefix_grouped_query", "gate[h]"),
        Mistake(3, "the first row's Aligner for every row", "model.py",
                [(expand, "pk, pv = (u.reshape(-1, *u.shape[-3:])[:1].expand(b, *u.shape[-3:]) for u in "
                          "(pk, pv))"),
                 (gate, gate.replace(".expand(b, self.n_heads)", ".reshape(-1, self.n_heads)[:1].expand(b, "
                                                                 "self.n_heads)"))],
                "prefix_per_row", "row 0 agrees and row 1 does not"),
        Mistake(3, "the prefix dropped when decoding with a cache", "model.py",
                [("if prefix is not None:", "if prefix is not None and cache is None:")],
                "prefix_with_cache", "cache.aligner_kv"),
        Mistake(3, "gate left in float32", "model.py", [(gate, gate.replace("gate.to(y.dtype)", "gate"))],
                "prefix_in_bfloat16", "bfloat16"),
        Mistake(3, "prefix weights left in float32", "model.py", [(att, att.replace(".type_as(xq)", ""))],
                "prefix_in_bfloat16", "bfloat16"),
    ] + lesson3_gradient()


def lesson3_gradient() -> list:
    """Wrong answers whose outputs are right and whose Aligner gets no gradient: training does nothing."""
    kv = "pk, pv = self.prefix_kv(tokens, x.dtype) if cache is None else cache.aligner_kv"
    gate = "gate.to(y.dtype).expand(b, self.n_heads).view(b, 1, k_heads, g, 1) * py"
    body = ["pk, pv = self.prefix_kv", "pk, pv = pk.expand", "p_scores = ", "p_att = ", "py = ", "y = y + "]
    no_grad = [("\n" + I12 + "tokens, gate = prefix", "\n" + I12 + "with torch.no_grad():\n" + I12 +
                "    tokens, gate = prefix")]
    no_grad += [("\n" + I12 + start, "\n" + I12 + "    " + start) for start in body]  # the block indented
    return [
        Mistake(3, "the prefix computed under torch.no_grad", "model.py", no_grad,
                "prefix_gradient", "tokens and gates get no gradient"),
        Mistake(3, "the prefix keys and values detached", "model.py",
                [(kv, kv.replace("pk, pv = self.prefix_kv(tokens, x.dtype)",
                                 "pk, pv = [u.detach() for u in self.prefix_kv(tokens, x.dtype)]"))],
                "prefix_gradient", "tokens get no gradient: no torch.no_grad"),
        Mistake(3, "the gate detached", "model.py", [(gate, gate.replace("gate.to(", "gate.detach().to("))],
                "prefix_gradient", "gates get no gradient"),
    ]


def lesson4() -> list:
    gates = "nn.Parameter(torch.zeros(n_gated, args.n_heads))"
    tokens = "nn.Parameter(torch.randn(shape))"
    return [
        Mistake(4, "gates start random", "aligner.py", [(gates, gates.replace("zeros", "randn"))],
                "aligner_parameters", "start at zero"),
        Mistake(4, "a gate row for every layer, not L - s", "aligner.py",
                [(gates, gates.replace("n_gated", "args.n_layers"))], "aligner_parameters", "5,056"),
        Mistake(4, "one gate per layer", "aligner.py", [(gates, gates.replace("args.n_heads", "1"))],
                "aligner_parameters", "5,056"),
        Mistake(4, "gates a plain tensor, not a parameter", "aligner.py",
                [(gates, "torch.zeros(n_gated, args.n_heads)")], "aligner_parameters", "5,056"),
        Mistake(4, "tokens start at zero", "aligner.py", [(tokens, tokens.replace("randn", "zeros"))],
                "aligner_parameters", "N(0, 1)"),
        Mistake(4, "tokens start small, as weights", "aligner.py",
                [(tokens, tokens.replace("torch.randn(shape)", "0.02 * torch.randn(shape)"))],
                "aligner_parameters", "N(0, 1)"),
        Mistake(4, "tokens frozen", "aligner.py", [(tokens, tokens.replace("(shape))",
                                                                           "(shape), requires_grad=False)"))],
                "aligner_parameters", "require a gradient"),
        Mistake(4, "per-layer tokens for every layer, not L - s", "aligner.py",
                [("(n_gated, n_tokens, args.dim) if per_layer", "(args.n_layers, n_tokens, args.dim) if "
                                                                "per_layer")],
                "aligner_parameters", "per_layer=True"),
        Mistake(4, "start layer off by one", "aligner.py",
                [("if layer < self.start_layer:", "if layer <= self.start_layer:")], "aligner_prefix",
                    "is None"),
        Mistake(4, "gate row of the layer, not layer - start_layer", "aligner.py",
                [("i = layer - self.start_layer", "i = layer")], "aligner_prefix", "l - start_layer"),
        Mistake(4, "per-layer variant ignored", "aligner.py",
                [("tokens = self.tokens[i] if self.per_layer else self.tokens", "tokens = self.tokens")],
                "aligner_prefix", "tokens[layer - start_layer]"),
        Mistake(4, "start layer written as 2", "aligner.py",
                [("if layer < self.start_layer:", "if layer < 2:"),
                 ("i = layer - self.start_layer", "i = layer - 2")], "aligner_prefix", "start_layer 0"),
        Mistake(4, "per-layer tokens indexed by the layer", "aligner.py",
                [("tokens = self.tokens[i] if self.per_layer",
                  "tokens = self.tokens[layer] if self.per_layer")],
                "aligner_prefix", "another layer's row"),
        Mistake(4, "tanh on the gate", "aligner.py",
                [("return tokens, self.gates[i]", "return tokens, torch.tanh(self.gates[i])")],
                    "aligner_prefix", "raw"),
    ]


def lesson5() -> list:
    ce = "F.cross_entropy(logits, labels[keep])"
    back = "(loss / accum).backward()"
    return [
        Mistake(5, "no shift", "train.py",
                [("labels = batch.labels[:, 1:]", "labels = batch.labels"), ("batch.ids[:, :-1]",
                                                                             "batch.ids")],
                "loss_without_padding", "no shift"),
        Mistake(5, "reads the token it predicts", "train.py", [("batch.ids[:, :-1]", "batch.ids[:, 1:]")],
                "loss_without_padding", "reads the token"),
        Mistake(5, "a sum, not a mean", "train.py", [(ce, ce[:-1] + ', reduction="sum")')],
                "loss_without_padding", "sum over"),
        Mistake(5, "the sum divided by every position", "train.py",
                [(ce, ce[:-1] + ', reduction="sum") / labels.numel()')], "loss_without_padding",
                    "every position"),
        Mistake(5, "a mean of row means", "train.py",
                [(f"return {ce}, {{}}", "per_token = F.cross_entropy(logits, labels[keep], "
                                        "reduction=\"none\")  # (n,)\n"
                  "    row_sums = torch.zeros(len(labels)).index_add(0, keep.nonzero()[:, 0], per_token)  # "
                  "(B,)\n"
                  "    return (row_sums / keep.sum(1)).mean(), {}")], "loss_with_padding", "each row's mean"),
        Mistake(5, "the Aligner not passed to the model", "train.py",
                [("model(batch.ids[:, :-1], aligner, keep=keep)", "model(batch.ids[:, :-1], keep=keep)")],
                "loss_without_padding", "base model's"),
        Mistake(5, "logits detached", "train.py", [("keep=keep)  # (n, vocab)", "keep=keep).detach()  # (n, "
                                                                                "vocab)")],
                "loss_gradient", "nothing detached"),
        Mistake(5, "micro-batch loss not divided", "train.py", [(back, "loss.backward()")],
                "accumulation_one_step", "divide each micro-batch's loss"),
        Mistake(5, "micro-batch loss divided by the batch size", "train.py",
                [(back, "(loss / cfg.batch_size).backward()")], "accumulation_one_step",
                "divide each micro-batch's loss"),
        Mistake(5, "micro-batch loss divided by the micro-batch size", "train.py", 
                [(back, "(loss / mb).backward()")],
                "accumulation_one_step", "divide each micro-batch's loss"),
        Mistake(5, "gradients zeroed before each micro-batch", "train.py",
                [(back, "run.optimizer.zero_grad()\n        " + back)], "accumulation_one_step", "add up"),
    ]


def lesson6() -> list:
    gate = "per_head = gate.float().view(k_heads, g, 1) * pv"
    return [
        Mistake(6, "wo transposed", "aligner.py", [("return wo.float() @", "return wo.float().T @")],
                "merge_equal_heads", "b = wo (g * wv p)"),
        Mistake(6, "gate left out", "aligner.py", [(gate, "per_head = pv.expand(k_heads, g, e)")],
                "merge_equal_heads", "b = wo (g * wv p)"),
        Mistake(6, "gate in group-major head order", "aligner.py",
                [(gate, gate.replace(".view(k_heads, g, 1)", ".view(g, k_heads, 1).transpose(0, 1)"))],
                "merge_equals_base_plus_aligner", "K = H passes"),
        Mistake(6, "wv left in its own dtype", "aligner.py", [("wv.float() @ tokens[0].float()",
                                                               "wv @ tokens[0]")],
                "merge_in_bfloat16", "float32"),
        Mistake(6, "bias returned in wo's dtype", "aligner.py",
                [("return wo.float() @ per_head.reshape(-1)", "return wo @ "
                                                              "per_head.reshape(-1).to(wo.dtype)")],
                "merge_in_bfloat16", "float32"),
    ]


def lesson7() -> list:
    margin = "margin = (policy[:b] - policy[b:]) - (ref[:b] - ref[b:])"
    loss = "-F.logsigmoid(self.beta * margin).mean()"
    refline = "ref = sequence_logprob(model, self.reference, ids, labels)"
    return [
        Mistake(7, "a mean per row, not a sum", "dpo.py", [(".sum(-1)  # (B,)", ".sum(-1) / keep.sum(-1)  # "
                                                                                "(B,)")],
                "sequence_logprob_sums_each_row", "mean over each row"),
        Mistake(7, "logits, not log-probabilities", "dpo.py",
                [("model(ids, aligner, keep=keep).log_softmax(-1)", "model(ids, aligner, keep=keep)")],
                "sequence_logprob_sums_each_row", "log_softmax"),
        Mistake(7, "chosen and rejected swapped", "dpo.py",
                [(margin, "margin = (policy[b:] - policy[:b]) - (ref[b:] - ref[:b])")],
                    "dpo_equals_the_formula", "swapped"),
        Mistake(7, "beta left out", "dpo.py", [(loss, "-F.logsigmoid(margin).mean()")],
                "dpo_equals_the_formula",
                "beta is left out"),
        Mistake(7, "the reference from the policy", "dpo.py",
                [("sequence_logprob(model, self.reference, ids, labels)", "sequence_logprob(model, aligner, "
                                                                          "ids, labels)")],
                "dpo_equals_the_formula", "log 2"),
        Mistake(7, "no reference term", "dpo.py", [(margin, "margin = policy[:b] - policy[b:]")],
                "dpo_equals_the_formula", "no reference term"),
        Mistake(7, "no shift", "dpo.py", [("batch.ids[:, :-1], batch.labels[:, 1:]",
                                           "batch.ids, batch.labels")],
                "dpo_equals_the_formula", "t + 1"),
        Mistake(7, "the sign", "dpo.py", [(loss, loss[1:])], "dpo_equals_the_formula", "the sign"),
        Mistake(7, "pairs read interleaved", "dpo.py",
                [(margin, "margin = (policy[0::2] - policy[1::2]) - (ref[0::2] - ref[1::2])")],
                "dpo_equals_the_formula", "interleaved"),
        Mistake(7, "a sum over the pairs, not a mean", "dpo.py", [(loss, loss.replace(".mean()", ".sum()"))],
                "dpo_equals_the_formula", "sum over the pairs"),
        Mistake(7, "beta outside logsigmoid", "dpo.py",
                [(loss, "-self.beta * F.logsigmoid(margin).mean()")], "dpo_equals_the_formula",
                "beta multiplies logsigmoid's result"),
        Mistake(7, "reference None: the policy's log-probabilities", "dpo.py",
                [(refline, refline + " if self.reference is not None else policy.detach()")],
                "dpo_reference_none_is_the_base", "reference None"),
        Mistake(7, "reference None: the policy's Aligner", "dpo.py",
                [(refline, refline.replace("self.reference,", "self.reference or aligner,"))],
                "dpo_reference_none_is_the_base", "None is the base model"),
    ]


MISTAKES = lesson1() + lesson2() + lesson3() + lesson4() + lesson5() + lesson6() + lesson7()
# run by the suite (tests/test_catalog.py); the rest with `python lessons.py catalog` (or CATALOG=all)
SAMPLE = ["3: the first row's Aligner for every row", "3: the prefix dropped when decoding with a cache",
          "5: micro-batch loss not divided", "5: micro-batch loss divided by the batch size"]  # passed before
