"""Answer prompts with a base model and an Aligner, streaming token by token.

    python generate.py --adapter out.pt --prompt "Give three tips for staying healthy."
    echo "Name a colour." | python generate.py --adapter out.pt --compare   # base vs aligned
    python generate.py --no-adapter --prompt "Hello"                         # the base model alone

The base model comes from the adapter's own metadata (override with --model). Prompts are put in
the Alpaca template when the adapter was trained with it (--raw sends the text as it is). Decoding
uses a KV cache: each layer's Aligner keys/values are computed once per prompt, at cache set-up,
and every new token then costs one position (model.Transformer.setup_cache).

This file also holds what train.py shares with it: the prompt template, the device and dtype
choice, and finding the default model. Read next: train.py.
"""
import argparse
import sys
from pathlib import Path

import torch

from aligner import Aligner
from model import Tokenizer, Transformer, UserError, load_model

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "checkpoints" / "smollm2-135m-instruct"

# The Alpaca template, exactly as the official Aligner code and Stanford Alpaca write it.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def format_prompt(instruction: str, input: str = "", template="alpaca") -> str:
    if template != "alpaca":
        return instruction + (f"\n{input}" if input else "")
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        name = "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_dir(path) -> Path:
    """The model directory to use; the embedded default is converted on first use."""
    if path is not None:
        return Path(path)
    if not (DEFAULT_MODEL_DIR / "params.json").is_file():
        from convert_weights import DEFAULT_MODEL, convert

        print(f"first use: making {DEFAULT_MODEL_DIR} (python convert_weights.py {DEFAULT_MODEL})",
              file=sys.stderr)
        convert(DEFAULT_MODEL, DEFAULT_MODEL_DIR, force=True)
    return DEFAULT_MODEL_DIR


def sample(logits, temperature: float, top_k: int, top_p: float):
    """Next token (1,) from logits (vocab,): greedy at temperature 0, else top-k/top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)  # (1,)
    logits = logits / temperature  # (vocab,)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]  # () the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (vocab,)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)  # (vocab,) each
        cut = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1) > top_p  # (vocab,)
        logits = logits.masked_fill(cut.scatter(0, order, cut), float("-inf"))  # (vocab,)
    return torch.multinomial(logits.softmax(-1), 1)  # (1,)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list, aligner=None, max_new_tokens=100,
             temperature=0.7, top_k=200, top_p=1.0, eos_id=None, step=None):
    """Yield new token ids one at a time. `step` is model's forward, or a compiled copy of it."""
    step = model if step is None else step
    device = model.output.weight.device
    n = len(prompt_ids)
    if n >= model.args.max_seq_len:
        raise UserError(f"the prompt is {n} tokens, but the model's context is "
                        f"{model.args.max_seq_len}: shorten it")
    total = min(n + max_new_tokens, model.args.max_seq_len)
    model.setup_cache(1, total, aligner)  # fresh cache; Aligner keys/values computed here, once
    try:
        tokens = torch.tensor([prompt_ids], device=device)  # (1, n)
        logits = model(tokens, aligner, torch.arange(n, device=device))[0, -1]  # (vocab,) prefill
        for pos in range(n, total):
            token = sample(logits, temperature, top_k, top_p)  # (1,)
            yield token.item()
            if token.item() == eos_id or pos + 1 == total:
                return
            logits = step(token.view(1, 1), aligner, torch.tensor([pos], device=device))[0, -1]
    finally:
        model.clear_cache()


def answer(model, tok, text, aligner, args, stream=None) -> str:
    """Generate for one prompt text; print the new text as it comes when `stream` is a file."""
    torch.manual_seed(args.seed)
    ids, shown = [], ""
    for t in generate(model, tok.encode(text), aligner, args.max_new_tokens, args.temperature,
                      args.top_k, args.top_p, tok.eos_id, getattr(args, "step", None)):
        ids.append(t)
        full = tok.decode(ids)
        if stream and not full.endswith("\ufffd"):  # wait for a whole multi-byte character
            stream.write(full[len(shown):])
            stream.flush()
            shown = full
    if stream:
        stream.write(tok.decode(ids)[len(shown):] + "\n")
    return tok.decode(ids)


def load_for_generation(args):
    """(model, tokenizer, aligner or None, template) from the command line's flags."""
    device = pick_device(args.device)
    aligner, template = None, "alpaca"
    if args.adapter:
        aligner = Aligner.load(args.adapter)
        template = aligner.meta.get("template", "alpaca")
    base = args.model or (aligner.meta.get("base") if aligner else None)
    if base and not (Path(base) / "params.json").is_file():
        raise UserError(f"the adapter's base model {base} is not there: pass --model DIR")
    path = model_dir(base)
    model = load_model(path, device, pick_dtype(args.dtype, device))
    model.use_sdpa(args.sdpa)
    if aligner is not None:
        aligner.check_fits(model.args, str(path))
        aligner.to(device)
    if args.compile:
        args.step = torch.compile(model, dynamic=False)
    return model, Tokenizer(path), aligner, "raw" if args.raw else template


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    p.add_argument("--adapter", help="an Aligner file from train.py (or an official checkpoint)")
    p.add_argument("--model", help="converted base model directory (default: the adapter's own "
                                   "base, else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: read stdin, one per line")
    p.add_argument("--raw", action="store_true", help="send prompts as they are, without the Alpaca template")
    p.add_argument("--no-adapter", action="store_true", help="answer with the base model alone")
    p.add_argument("--compare", action="store_true", help="answer each prompt with the base model and with the adapter")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this much probability")
    p.add_argument("--seed", type=int, default=1337, help="random seed, reset for every answer")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on cuda, float32 elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the single-token step")
    p.add_argument("--sdpa", action="store_true", help="causal attention through scaled_dot_product_attention")
    args = p.parse_args(argv)
    try:
        if args.compare and not args.adapter:
            raise UserError("--compare needs --adapter FILE")
        model, tok, aligner, template = load_for_generation(args)
        prompts = args.prompt if args.prompt else (line.rstrip("\n") for line in sys.stdin)
        for text in prompts:
            if not text.strip():
                continue
            full = format_prompt(text, template=template)
            if args.compare:
                for label, a in (("base", None), ("aligned", aligner)):
                    print(f"--- {label}: ", end="", flush=True)
                    answer(model, tok, full, a, args, sys.stdout)
            else:
                answer(model, tok, full, None if args.no_adapter else aligner, args, sys.stdout)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
