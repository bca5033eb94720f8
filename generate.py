"""Answer prompts with a base model and an Aligner, streaming token by token.

    python generate.py --adapter out.pt --prompt "Give three tips for staying healthy."
    echo "Name a colour." | python generate.py --adapter out.pt --compare   # base vs aligned
    python generate.py --no-adapter --prompt "Hello"                         # the base model alone

The base model comes from the adapter's own metadata (override with --model). Prompts are put in
the Alpaca template when the adapter was trained with it (--raw sends the text as it is). Decoding
uses a KV cache: each layer's Aligner keys/values are computed once per prompt, at cache set-up,
and every new token then costs one position (model.Transformer.setup_cache).
Read next: dpo.py and parallel.py (train.py's optional parts), then train.py.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from aligner import Aligner
from cli import (UserError, check_flags, count, device_name, flag, non_negative_float, parse_config,
                 path_text, pick_device, pick_dtype, positive_int, probability, random_seed, run_main)
from convert_weights import load_model, model_dir
from data import Tokenizer, format_prompt, valid_text
from model import Transformer


@dataclass
class Sampling:
    """How the next token is chosen; the defaults are the official generate/aligner.py's."""
    max_new_tokens: int = flag(100, "tokens to generate at most", positive_int)
    temperature: float = flag(0.7, "sampling temperature; 0 means greedy", non_negative_float)
    top_k: int = flag(200, "sample among the k most likely tokens (0: all)", count)
    top_p: float = flag(1.0, "nucleus sampling: smallest set with this much probability", probability)
    seed: int = flag(1337, "random seed, reset for every answer", random_seed)

    def __post_init__(self):
        check_flags(self)


def sample(logits, s: Sampling):
    """Next token (1,) from logits (vocab,): greedy at temperature 0, else top-k/top-p sampling."""
    if s.temperature <= 0:
        return logits.argmax(-1, keepdim=True)  # (1,)
    logits = logits / s.temperature  # (vocab,)
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k).values[-1]  # () the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (vocab,)
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)  # (vocab,) each
        cut = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > s.top_p  # (vocab,)
        logits = logits.masked_fill(cut.scatter(0, order, cut), float("-inf"))  # (vocab,)
    return torch.multinomial(logits.softmax(-1), 1)  # (1,)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list, aligner=None, sampling=Sampling(), eos_id=None,
             forward=None):
    """Yield new token ids one at a time. `forward` runs the one-token steps: the model itself, or
    a torch.compile'd copy of it."""
    forward = forward or model
    device = model.output.weight.device
    n = len(prompt_ids)
    if n >= model.args.max_seq_len:
        raise UserError(f"the prompt is {n} tokens, but the model's context is "
                        f"{model.args.max_seq_len}: shorten it")
    total = min(n + sampling.max_new_tokens, model.args.max_seq_len)
    model.setup_cache(1, total, aligner)  # fresh cache; Aligner keys/values computed here, once
    try:
        ids = torch.tensor([prompt_ids], device=device)  # (1, n)
        logits = model(ids, aligner, torch.arange(n, device=device))[0, -1]  # (vocab,) prefill
        for pos in range(n, total):
            next_id = sample(logits, sampling)  # (1,)
            yield next_id.item()
            if next_id.item() == eos_id or pos + 1 == total:
                return
            pos_t = torch.tensor([pos], device=device)  # (1,)
            logits = forward(next_id.view(1, 1), aligner, pos_t)[0, -1]  # (vocab,)
    finally:
        model.clear_cache()


def answer(model, tok, text: str, aligner=None, sampling=Sampling(), stream=None, forward=None) -> str:
    """Generate for one prompt text; print the new text as it comes when `stream` is a file."""
    torch.manual_seed(sampling.seed)
    ids, shown = [], ""
    for i in generate(model, tok.encode(text), aligner, sampling, tok.eos_id, forward):
        ids.append(i)
        full = tok.decode(ids)
        if stream and not full.endswith("\ufffd"):  # wait for a whole multi-byte character
            stream.write(full[len(shown):])
            stream.flush()
            shown = full
    if stream:
        stream.write(tok.decode(ids)[len(shown):] + "\n")
    return tok.decode(ids)


@dataclass
class GenerateConfig(Sampling):
    adapter: str = flag(None, "an Aligner file from train.py (or an official checkpoint)", path_text)
    model: str = flag(None, "converted base model directory (default: the adapter's own base, else "
                            "the embedded SmolLM2-135M-Instruct)", path_text)
    prompt: list = flag(None, "a prompt (repeatable); default: read stdin, one per line", action="append")
    raw: bool = flag(False, "send prompts as they are, without the Alpaca template")
    no_adapter: bool = flag(False, "answer with the base model alone")
    compare: bool = flag(False, "answer each prompt with the base model and with the adapter")
    device: str = flag("auto", "auto (cuda, then mps, then cpu), or a torch device", device_name)
    dtype: str = flag("auto", "auto: bfloat16 on cuda, float32 elsewhere",
                      choices=["auto", "float32", "bfloat16", "float16"])
    compile: bool = flag(False, "torch.compile the single-token step")
    sdpa: bool = flag(False, "causal attention through scaled_dot_product_attention")


def load_for_generation(cfg: GenerateConfig):
    """(model, tokenizer, aligner or None, template) as the config asks."""
    device = pick_device(cfg.device)
    aligner, template = None, "alpaca"
    if cfg.adapter:
        aligner = Aligner.load(cfg.adapter)
        template = aligner.meta.get("template", "alpaca")
    base = cfg.model or (aligner.meta.get("base") if aligner else None)
    if base and not cfg.model and not (Path(base) / "params.json").is_file():
        raise UserError(f"{cfg.adapter} was trained on {base}, which is not there: pass --model DIR")
    path = model_dir(base)
    model = load_model(path, device, pick_dtype(cfg.dtype, device))
    model.use_sdpa(cfg.sdpa)
    if aligner is not None and not cfg.no_adapter:
        aligner.check_fits(model.args, str(path))
        if model.args.wo_bias_from >= 0:
            raise UserError(f"{path} already has an Aligner merged into it (aligner.py merge): use it "
                            f"without --adapter, or pass the original base with --model")
        aligner.to(device)
    return model, Tokenizer(path), aligner, "raw" if cfg.raw else template


def respond(cfg: GenerateConfig):
    if cfg.compare and not cfg.adapter:
        raise UserError("--compare needs --adapter FILE")
    model, tok, aligner, template = load_for_generation(cfg)
    forward = torch.compile(model, dynamic=False) if cfg.compile else model
    for text in filter(str.strip, cfg.prompt or stdin_lines()):
        if not valid_text(text):
            raise UserError("a prompt is not valid UTF-8 text")
        full = format_prompt(text, template=template)
        if cfg.compare:
            for label, a in (("base", None), ("aligned", aligner)):
                print(f"--- {label}: ", end="", flush=True)
                answer(model, tok, full, a, cfg, sys.stdout, forward)
        else:
            answer(model, tok, full, None if cfg.no_adapter else aligner, cfg, sys.stdout, forward)


def stdin_lines():
    """The lines of standard input, one prompt each; a line that is not UTF-8 is refused."""
    for n, line in enumerate(sys.stdin.buffer, 1):
        try:
            yield line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UserError(f"standard input, line {n}: not UTF-8 text") from None


def main(argv=None):
    run_main(respond, parse_config(GenerateConfig, argv, __doc__))


if __name__ == "__main__":
    main()
