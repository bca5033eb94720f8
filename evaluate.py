"""Evaluate the base model and Aligners with EleutherAI's lm-evaluation-harness (lm-eval): its tasks,
its numbers, its table and JSON, with our model as an lm-eval model class.

    pip install -r requirements-eval.txt             # lm-eval: only this command needs it
    python evaluate.py --adapter out.pt --tasks mmlu,gsm8k       # lm-eval's own tasks (from the hub)
    python evaluate.py --adapter a.pt --adapter b.pt --base --tasks aligner_mc,aligner_arith --limit 50
    python evaluate.py --tasks aligner_form --num-fewshot 0 --output-path results.json --log-samples

`AlignerLM` answers lm-eval's three kinds of request over one loaded base: loglikelihood (a
continuation's log-probability after a context, and whether it is the greedy one), loglikelihood_rolling
(a whole text's, in windows of the context) and generate_until (greedy decoding through generate.py,
cut at the task's stop strings), in batches. It tokenizes as lm-eval's `hf` model does over the Hugging
Face export (adapter.py merge --format hf): BOS first where the tokenizer adds one, the context/
continuation split of lm-eval's TemplateLM, so the three routes (this command, serve.py through
lm-eval's local-completions, --model hf on the export) give the same numbers. Each --adapter is
evaluated in turn over the one base, after the base alone when --base is given (or no --adapter).
Tasks: lm-eval's own names, and the local ones in evaluation/tasks (no hub; docs/evaluation.md).
Read next: docs/evaluation.md.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from generate import Sampling, generate_batch
from support.adapter_file import fitting, load_aligner, one_base
from support.checkpoint import load_base
from support.errors import UserError
from support.flags import Runtime, count, flag, path_text, positive_float, positive_int, run_command
from support.outputs import check_output_file
from support.temporary import atomic_write

TASKS = Path(__file__).resolve().parent / "evaluation" / "tasks"  # the local tasks (evaluation/make_tasks.py)


@dataclass
class EvalConfig:
    """What to evaluate and lm-eval's options, passed through (--help lists these)."""
    tasks: str = flag(None, "lm-eval task names, comma-separated: its own (the hub) or the local "
                      "aligner_mc, aligner_arith, aligner_form, aligner_knowledge", required=True)
    adapter: list = flag(None, "an Aligner file (repeatable: each is evaluated in turn over one base)",
                         path_text, action="append")
    model: str = flag(None, "converted base model directory (default: the adapters' own base)", path_text)
    base: bool = flag(False, "evaluate the base model alone too (the default when no --adapter is given)")
    include: str = flag(None, "a folder of more lm-eval task YAML files (evaluation/tasks is always read)",
                        path_text)
    num_fewshot: int = flag(None, "few-shot examples per question (default: each task's own)", count)
    limit: float = flag(None, "documents per task: a count, or a fraction of each task below 1",
                        positive_float)
    batch_size: int = flag(8, "sequences per forward pass", positive_int)
    max_length: int = flag(None, "tokens a sequence may hold (default: the model's context)", positive_int)
    apply_chat_template: bool = flag(False, "put each question in the model's chat template (lm-eval's "
                                     "--apply_chat_template)")
    gen_kwargs: str = flag(None, "lm-eval's generation options for generate_until tasks, k=v,k=v")
    output_path: str = flag(None, "write lm-eval's results (every model's) as one JSON file", path_text)
    log_samples: bool = flag(False, "with --output-path: each document's requests and answers too")
    seed: int = flag(0, "lm-eval's random seeds (few-shot choice, sampling)", count)

    def __post_init__(self):
        if self.limit is not None and not (self.limit < 1 or self.limit == int(self.limit) <= 10**9):
            raise UserError(f"--limit {self.limit:g}: a whole number of documents (at most 10^9), or a "
                            f"fraction below 1")
        if not all(self.tasks.split(",")):
            raise UserError(f"--tasks {self.tasks!r}: an empty task name; give names separated by commas")
        if self.gen_kwargs and not all("=" in kv for kv in self.gen_kwargs.split(",")):
            raise UserError(f"--gen-kwargs {self.gen_kwargs!r}: give k=v pairs separated by commas, "
                            f"as max_gen_toks=64,temperature=0")
        if self.log_samples and not self.output_path:
            raise UserError("--log-samples writes into --output-path: name the file")


def lm_eval_module():
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise UserError("evaluate.py needs lm-eval: pip install -r requirements-eval.txt") from None
    return lm_eval, TemplateLM


def aligner_lm(base, aligner, batch_size: int, max_length: int):
    """An lm-eval model (a TemplateLM) over the Base `base` with `aligner` (None: the base alone)."""
    _, TemplateLM = lm_eval_module()
    model, tok = base.model, base.tok

    class AlignerLM(TemplateLM):
        @property
        def eot_token_id(self):
            return tok.eos_id

        @property
        def prefix_token_id(self):  # the one-token context of an empty one: BOS, as lm-eval's hf model
            return tok.bos_id if tok.bos_id is not None else tok.eos_id

        @property
        def tokenizer_name(self):
            return base.path.name

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            """BOS first where our tokenizer adds one (as the export's AutoTokenizer does), unless the
            text already starts with it or add_special_tokens is False."""
            starts = tok.bos_id is not None and string.startswith(tok.token_text(tok.bos_id))
            return tok.encode(string, bos=tok.add_bos and add_special_tokens is not False and not starts)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            longest = max(len(cont) for _, _, cont in requests)
            if longest > max_length:
                raise UserError(f"a continuation of {longest} tokens does not fit --max-length {max_length}: "
                                f"raise --max-length")
            seqs = [(ctx + cont)[-(max_length + 1):] for _, ctx, cont in requests]
            return score(model, aligner, seqs, [len(cont) for _, _, cont in requests], batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            from lm_eval import utils

            out = []
            for (string,) in [r.args for r in requests]:
                windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=max_length, context_len=1)]
                scores = self._loglikelihood_tokens([(None, context, x) for context, x in windows])
                out.append(sum(lp for lp, _ in scores))
            return out

        def generate_until(self, requests, disable_tqdm=False):
            args = [r.args for r in requests]
            return until(model, tok, self.tok_encode, aligner, args, batch_size, max_length)

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return base.chat(aligner).render(chat_history, add_generation_prompt)

        def chat_template(self, chat_template=False):
            return base.chat(aligner).source if chat_template else None

    return AlignerLM()


@torch.no_grad()
def score(model, aligner, seqs: list, n_cont: list, batch_size: int) -> list:
    """(log-probability of the last n_cont[i] tokens of seqs[i], are they each the likeliest?): the
    logits at positions len - n - 1 .. len - 2 predict them. Longest first, in batches, right-padded
    (a causal model's earlier positions never see what follows)."""
    device = model.output.weight.device
    order, out = sorted(range(len(seqs)), key=lambda i: -len(seqs[i])), [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        width = len(seqs[rows[0]]) - 1
        padded = [seqs[i][:-1] + [0] * (width + 1 - len(seqs[i])) for i in rows]
        ids = torch.tensor(padded, device=device)  # (B, T)
        logp = F.log_softmax(model(ids, aligner), -1)  # (B, T, vocab)
        for row, i in enumerate(rows):
            n, end = n_cont[i], len(seqs[i]) - 1
            target = torch.tensor(seqs[i][-n:], device=device)  # (n,)
            at = logp[row, end - n: end]  # (n, vocab)
            picked = at.gather(-1, target[:, None])[:, 0]  # (n,)
            out[i] = (picked.double().sum().item(), bool((at.argmax(-1) == target).all()))
    return out


def until(model, tok, encode, aligner, requests: list, batch_size: int, max_length: int) -> list:
    """generate_until: each (context, options) answered greedily (or at the options' temperature),
    up to max_gen_toks tokens, EOS or the first of its stop strings ("until"), which is cut off.
    Requests with the same options are decoded together."""
    out, groups = [None] * len(requests), {}
    for i, (_, options) in enumerate(requests):
        groups.setdefault(json.dumps(options, sort_keys=True, default=str), []).append(i)
    for key, members in groups.items():
        options = json.loads(key)
        stops = options.get("until") or []
        stops = [stops] if isinstance(stops, str) else stops
        n_new = int(options.get("max_gen_toks", 256))
        if not 0 < n_new < max_length:
            raise UserError(f"max_gen_toks {n_new} leaves no room for the question in --max-length "
                            f"{max_length}: lower it (--gen-kwargs max_gen_toks=...) or raise --max-length")
        t = float(options.get("temperature", 0.0)) if options.get("do_sample", False) else 0.0
        sampling = Sampling(max_new_tokens=n_new, temperature=t, top_k=0, top_p=1.0, seed=0)
        for start in range(0, len(members), batch_size):
            rows = members[start: start + batch_size]
            prompts = [encode(requests[i][0])[-(max_length - n_new):] for i in rows]
            answers = generate_batch(model, prompts, aligner, sampling, tok.eos_id, pad_id=0)
            for i, ids in zip(rows, answers):
                text = tok.decode(ids)
                out[i] = text[:min([text.find(s) for s in stops if s and s in text] or [len(text)])]
    return out


def evaluate_one(lm_eval, lm, cfg: EvalConfig, manager) -> dict:
    """lm-eval's simple_evaluate on one model: its results dict (with the samples when logged)."""
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=cfg.tasks.split(","), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            task_manager=manager, apply_chat_template=cfg.apply_chat_template, gen_kwargs=cfg.gen_kwargs,
            log_samples=cfg.log_samples, bootstrap_iters=1000, random_seed=cfg.seed,
            numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    except (KeyError, ValueError, FileNotFoundError) as e:  # lm-eval's words for an unknown task or option
        raise UserError(f"lm-eval refused the tasks or options: {type(e).__name__}: {str(e)[:200]}") from None


def task_manager(cfg: EvalConfig):
    """lm-eval's TaskManager over its own tasks, the local ones and --include's; unknown names refused."""
    from lm_eval.tasks import TaskManager

    if cfg.include and not Path(cfg.include).is_dir():
        raise UserError(f"--include {cfg.include} is not a directory of task YAML files")
    manager = TaskManager(include_path=[str(TASKS)] + ([cfg.include] if cfg.include else []))
    unknown = [t for t in cfg.tasks.split(",") if t not in manager.all_tasks]
    if unknown:
        local = sorted(n for n in manager.all_tasks if n.startswith("aligner_"))
        raise UserError(f"--tasks: no lm-eval task named {', '.join(unknown)} (lm-eval's own, or the "
                        f"local {', '.join(local)})")
    return manager


def check_chat_templates(base, runs: list):
    """--apply-chat-template: each Aligner trained in a chat template, and that template (or the base
    directory's, for the base alone) at hand, before any task runs."""
    for name, aligner in runs:
        trained = aligner.meta.get("template", "alpaca") if aligner is not None else "chat"
        if trained != "chat":
            raise UserError(f"--apply-chat-template: {name} was trained with the {trained} template, not a "
                            f"chat template; evaluate it without --apply-chat-template")
        try:
            base.chat(aligner)
        except UserError as e:
            raise UserError(f"--apply-chat-template: {name}: {str(e).split(': use')[0]}; evaluate it "
                            f"without --apply-chat-template") from None


def evaluate(cfg: EvalConfig, runtime: Runtime):
    """Every model asked for, in turn over one loaded base: lm-eval's table for each, one JSON for all."""
    lm_eval, _ = lm_eval_module()
    from lm_eval.utils import make_table

    adapters = [(path, load_aligner(path)) for path in cfg.adapter or []]
    base_path = one_base(adapters, cfg.model)
    if cfg.output_path:
        check_output_file(cfg.output_path, cfg.adapter or [], [base_path] if base_path else [])
    manager = task_manager(cfg)
    base = load_base(base_path, runtime, runtime.pick_device())
    max_length = min(cfg.max_length or base.model.args.max_seq_len, base.model.args.max_seq_len)
    runs = ([("base", None)] if cfg.base or not adapters else []) + adapters
    for name, aligner in adapters:  # every one before the first evaluation, not after the others' work
        fitting(aligner, base.model.args, base.path, name).to(base.model.output.weight.device)
    if cfg.apply_chat_template:
        check_chat_templates(base, runs)
    results = {}
    for name, aligner in runs:
        lm = aligner_lm(base, aligner, cfg.batch_size, max_length)
        results[name] = evaluate_one(lm_eval, lm, cfg, manager)
        print(f"\n{name}:\n{make_table(results[name])}", flush=True)
    if cfg.output_path:
        text = json.dumps(results, indent=2, default=str, ensure_ascii=False)
        atomic_write(cfg.output_path, lambda f: f.write(text.encode()))
        print(f"wrote {cfg.output_path}", file=sys.stderr)
    return results


def main(argv=None):
    run_command(evaluate, argv, __doc__, EvalConfig, Runtime)


if __name__ == "__main__":
    main()
