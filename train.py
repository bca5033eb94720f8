"""Train an Aligner on a frozen LLaMA: a plain loop, the official recipe as defaults.

    python train.py --tokens 1 --data alpaca.json                 # embedded default model
    python train.py --model checkpoints/llama-2-7b --data alpaca_data.json --out alpaca-1tok.pt
    python train.py --dpo --data prefs.json --init alpaca-1tok.pt  # value alignment (DPO)

Data: Alpaca JSON (a list of {"instruction", "input", "output"}) or JSONL of the same records;
for --dpo, {"instruction", "input", "chosen", "rejected"}. Prompts use the Alpaca template
(generate.py); the loss is on the response tokens only unless --full-text.

Recipe (official finetune/aligner.py): AdamW lr 9e-3, weight decay 0.02, batch 64 = micro-batch 8
x 8 accumulation, 8 epochs, warmup 2 epochs then constant, sequence length 512. Only the Aligner's
few thousand numbers train: the base is frozen and never copied, and so is the optimizer state
tiny. The output file holds the Aligner (with optimizer state and step for --resume) and is
written atomically; generate.py reads it directly.

Read next: generate.py, then aligner.py's `merge` and `inspect`.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from aligner import Aligner, atomic_save
from generate import format_prompt, generate, model_dir, pick_device, pick_dtype
from model import Tokenizer, UserError, load_model

IGNORE = -100  # label of a token that the loss skips (prompt and padding)


# ---- data ----------------------------------------------------------------------------------------
def read_records(path, fields, optional=("input",)):
    """A list of dicts with string `fields` from a JSON list (or JSONL, for a .jsonl file), or a
    UserError that says where the problem is."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        if path.suffix != ".jsonl":
            records = json.loads(text)
        else:
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}: invalid JSON on line {n}, column {e.colno}: {e.msg}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a list of records, found a {type(records).__name__}")
    if not records:
        raise UserError(f"{path}: no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record {i} is a {type(r).__name__}, not an object")
        for f in fields + tuple(optional):
            if f not in r and f in optional:
                continue
            if f not in r:
                raise UserError(f"{path}: record {i} has no {f!r} field")
            if not isinstance(r[f], str):
                raise UserError(f"{path}: record {i}: field {f!r} is a {type(r[f]).__name__}, not a string")
    return records


def encode_example(tok, prompt: str, response: str, max_len: int, full_text: bool):
    """(ids, labels, prompt) for prompt + response + EOS, truncated to max_len, the prompt masked
    unless full_text. Returns None when truncation leaves no response token to learn from."""
    n_prompt = len(tok.encode(prompt))
    ids = tok.encode(prompt + response, eos=True)
    labels = list(ids) if full_text else [IGNORE] * n_prompt + ids[n_prompt:]
    ids, labels = ids[:max_len], labels[:max_len]
    return (ids, labels, prompt) if any(label != IGNORE for label in labels[n_prompt:]) else None


def load_sft_data(path, tok, max_len, template, full_text):
    records = read_records(path, ("instruction", "output"))
    examples, truncated, dropped = [], 0, 0
    for r in records:
        prompt = format_prompt(r["instruction"], r.get("input", ""), template)
        ex = encode_example(tok, prompt, r["output"], max_len, full_text)
        truncated += len(tok.encode(prompt + r["output"], eos=True)) > max_len
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise UserError(f"{path}: every example is longer than --max-seq-len {max_len} before its "
                        f"response starts; raise --max-seq-len")
    return examples, truncated, dropped


def collate(examples, pad_id, device):
    """Right-pad a micro-batch: ids (B, T) and labels (B, T), padding labelled IGNORE."""
    t = max(len(ex[0]) for ex in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)  # (B, T)
    for i, (x, y, *_) in enumerate(examples):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    return ids.to(device), labels.to(device)


def batch_indices(n_examples, batch_size, step, seed):
    """The examples of optimizer step `step`: drawn with replacement (as the official code does),
    from a generator seeded by (seed, step), so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_examples, (batch_size,), generator=g).tolist()


# ---- the objective -------------------------------------------------------------------------------
def sft_loss(forward, aligner, ids, labels):
    """Next-token cross-entropy over the labelled tokens: logits at t predict the token at t+1."""
    logits = forward(ids[:, :-1], aligner)  # (B, T-1, vocab)
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


def get_lr(step, args, total_steps, warmup_steps):
    """1) linear warmup over `warmup_steps` optimizer steps (the official script counted
    micro-steps against optimizer steps, so its lr only ever reached about half the peak);
    2) then constant (the paper's recipe) or 3) cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    if args.schedule == "constant":
        return args.lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def estimate_loss(forward, aligner, examples, args, pad_id, device, loss_fn):
    """Mean loss over the first --eval-batches micro-batches of the validation set."""
    losses = []
    for i in range(0, min(len(examples), args.eval_batches * args.micro_batch_size), args.micro_batch_size):
        batch = collate_for(args, examples[i: i + args.micro_batch_size], pad_id, device)
        losses.append(loss_fn(forward, aligner, *batch).item())
    return sum(losses) / max(1, len(losses))


def collate_for(args, examples, pad_id, device):
    if args.dpo:  # chosen answers first, then the rejected ones: one batch of 2B sequences
        return collate([(c, cl) for c, cl, *_ in examples] + [(r, rl) for _, _, r, rl, _ in examples],
                       pad_id, device)
    return collate(examples, pad_id, device)


# ---- DPO: value alignment on preference pairs ---------------------------------------------------
def load_dpo_data(path, tok, max_len, template):
    return dpo_pairs(read_records(path, ("instruction", "chosen", "rejected")), tok, max_len, template, path)


def dpo_pairs(records, tok, max_len, template, path="data"):
    """(chosen ids, labels, rejected ids, labels, prompt) per usable record of {instruction,
    input, chosen, rejected}; pairs whose answers are identical teach nothing and are skipped."""
    pairs, truncated, dropped = [], 0, 0
    for i, r in enumerate(records):
        if not r["chosen"].strip() or not r["rejected"].strip():
            raise UserError(f"{path}: record {i}: 'chosen' and 'rejected' must not be empty")
        if r["chosen"] == r["rejected"]:
            print(f"warning: {path}: record {i}: chosen and rejected are identical; skipped", file=sys.stderr)
            continue
        prompt = format_prompt(r["instruction"], r.get("input", ""), template)
        c = encode_example(tok, prompt, r["chosen"], max_len, False)
        rej = encode_example(tok, prompt, r["rejected"], max_len, False)
        truncated += any(len(tok.encode(prompt + r[k], eos=True)) > max_len for k in ("chosen", "rejected"))
        if c is None or rej is None:
            dropped += 1
        else:
            pairs.append((c[0], c[1], rej[0], rej[1], prompt))
    if not pairs:
        raise UserError(f"{path}: no usable preference pair (all identical, or longer than "
                        f"--max-seq-len {max_len})")
    return pairs, truncated, dropped


def sequence_logprob(logits, labels):
    """Sum of log p(label) over the labelled tokens: logits (B, T, vocab), labels (B, T) -> (B,)."""
    logp = torch.gather(logits.log_softmax(-1), -1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T)
    return (logp * (labels != IGNORE)).sum(-1)  # (B,)


class DPOLoss:
    """-logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), log-probabilities summed over the
    response tokens. The reference policy is the SAME frozen base model with a frozen copy of the
    starting Aligner (or with none): memory is one model plus two tiny Aligners, never a second
    copy of the base weights. That is what makes DPO cheap with an Aligner."""

    def __init__(self, reference, beta: float):
        self.reference = reference.requires_grad_(False) if reference is not None else None
        self.beta, self.rows = beta, []

    def __call__(self, forward, aligner, ids, labels):
        policy = sequence_logprob(forward(ids[:, :-1], aligner), labels[:, 1:])  # (2B,)
        with torch.no_grad():
            ref = sequence_logprob(forward(ids[:, :-1], self.reference), labels[:, 1:])  # (2B,)
        b = ids.shape[0] // 2  # chosen first, then rejected
        margin = (policy[:b] - policy[b:]) - (ref[:b] - ref[b:])  # (B,)
        self.rows.append({"reward_accuracy": (margin > 0).float().mean().item(),
                          "margin": self.beta * margin.mean().item(),
                          "logp_chosen": policy[:b].mean().item(), "logp_rejected": policy[b:].mean().item()})
        return -F.logsigmoid(self.beta * margin).mean()

    def pop_stats(self):
        rows, self.rows = self.rows, []
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


# ---- several processes (torchrun) -----------------------------------------------------------------
def setup_distributed(args):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join the process group: NCCL
    on GPUs, gloo on CPUs. Every rank holds the frozen base (or its shard, with --shard) and the
    same tiny Aligner; each takes its share of every optimizer step's micro-batches."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(args.device)
    if world == 1:
        if args.shard:
            raise UserError("--shard splits the model across processes: start with torchrun --nproc_per_node K")
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def all_sum(value: float, world: int, device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


# ---- the loop ------------------------------------------------------------------------------------
def train(args):
    torch.manual_seed(args.seed)
    rank, world, device = setup_distributed(args)
    say = print if rank == 0 else (lambda *a, **k: None)  # only rank 0 talks, logs and saves
    dtype = pick_dtype(args.dtype, device)
    out = Path(args.out)
    metrics_path = out.with_suffix(".metrics.jsonl")
    if args.micro_batch_size < 1 or args.batch_size % (args.micro_batch_size * world):
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                        f"{args.micro_batch_size} times the {world} process(es)")
    resume = Aligner.load(out) if args.resume else None
    out.parent.mkdir(parents=True, exist_ok=True)
    path = model_dir(args.model)
    model = load_model(path, device, dtype)
    model.activation_checkpointing = args.activation_checkpointing
    model.use_sdpa(args.sdpa)
    if args.shard:  # FSDP2: each rank keeps 1/world of every layer, gathered just in time
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    tok = Tokenizer(path)
    template = "raw" if args.raw else "alpaca"
    if args.dpo:
        examples, truncated, dropped = load_dpo_data(args.data, tok, args.max_seq_len, template)
    else:
        examples, truncated, dropped = load_sft_data(args.data, tok, args.max_seq_len, template, args.full_text)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_val = int(len(examples) * args.val_fraction) if len(examples) > 1 else 0
    val = [examples[i] for i in order[:n_val]]
    train_set = [examples[i] for i in order[n_val:]]

    meta = {"base": str(path.resolve()), "template": template, "mode": "dpo" if args.dpo else "sft",
            "data": Path(args.data).name}
    if resume is not None:
        aligner = resume
    elif args.init:
        aligner = Aligner.load(args.init)
        aligner.meta.update(meta)
    else:
        aligner = Aligner(model.args, args.tokens, args.start_layer, args.per_layer, meta)
    aligner.check_fits(model.args, str(path))
    aligner.to(device)
    loss_fn = sft_loss
    if args.dpo:  # the reference is the starting Aligner (--init), or the base model alone
        loss_fn = DPOLoss(Aligner.load(args.init).to(device) if args.init else None, args.beta)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95))
    step = 0
    if resume is not None:
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    forward = torch.compile(model) if args.compile else model
    steps_per_epoch = max(1, len(train_set) // args.batch_size)
    total = args.max_steps or args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_epochs * steps_per_epoch)
    accum = args.batch_size // args.micro_batch_size  # micro-batches per step, over all ranks together
    pad_id = tok.eos_id if tok.eos_id is not None else 0

    n_base = sum(p.numel() for p in model.parameters())
    say(f"model {path} ({n_base / 1e6:.1f}M parameters, frozen) on {device}, {str(dtype).removeprefix('torch.')}")
    say(f"Aligner: {aligner.n_tokens} token(s){' per layer' if aligner.per_layer else ''}, layers "
          f"{aligner.start_layer}..{model.args.n_layers - 1}: {aligner.n_params():,} trainable parameters")
    say(f"data {args.data}: {len(train_set)} train, {len(val)} validation examples; {truncated} "
          f"truncated to {args.max_seq_len} tokens, {dropped} dropped (no response token left)")
    say(f"{total} optimizer steps of {args.batch_size} examples ({accum} x {args.micro_batch_size}), "
          f"warmup {warmup}, lr {args.lr} {args.schedule}{f', {world} processes' if world > 1 else ''}")

    def save():
        if rank > 0:
            return
        atomic_save({"aligner": aligner.to_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}},
                    out)

    def log(row):
        if rank > 0:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    if resume is None and rank == 0:
        metrics_path.write_text("")  # a fresh run starts a fresh metrics file; --resume appends
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    sample_prompt = (val or train_set)[0][-1]  # a fixed held-out prompt, answered at each eval
    def evaluate():
        if not val:
            return
        val_loss = estimate_loss(forward, aligner, val, args, pad_id, device, loss_fn)
        log({"step": step, "val_loss": val_loss,
             **{f"val_{k}": v for k, v in getattr(loss_fn, "pop_stats", dict)().items()}})
        if rank == 0 and not args.shard:  # a sharded model decodes only with every rank: no sample
            text = tok.decode(generate(model, tok.encode(sample_prompt), aligner, 40, 0.0, eos_id=tok.eos_id))
            bar.write(f"step {step}: val loss {val_loss:.4f} | sample: {text.strip()[:200]!r}")

    bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, disable=args.quiet or rank > 0)
    t0, tokens_seen = time.time(), 0
    if args.eval_every and resume is None:
        evaluate()  # the starting point: the base model, or the --init Aligner
    try:
        while step < total:
            out_of_time = bool(args.max_time) and time.time() - t0 > args.max_time
            if all_sum(float(bool(interrupted) or out_of_time), world, device) > 0:  # all ranks agree
                if out_of_time:
                    bar.write(f"stopping at step {step}: --max-time {args.max_time}s reached")
                break
            lr = get_lr(step, args, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(len(train_set), args.batch_size, step, args.seed)
            loss_sum = 0.0
            for m in range(rank, accum, world):  # this rank's share of the step
                micro = [train_set[i] for i in idx[m * args.micro_batch_size: (m + 1) * args.micro_batch_size]]
                batch = collate_for(args, micro, pad_id, device)
                loss = loss_fn(forward, aligner, *batch) / accum  # the mean over the accumulated micro-batches
                loss.backward()
                loss_sum += loss.item()
                tokens_seen += batch[0].numel() * world
            if world > 1:  # gradients summed over ranks: the same step a single process takes
                for p in aligner.parameters():
                    dist.all_reduce(p.grad)
                loss_sum = all_sum(loss_sum, world, device)
            if not math.isfinite(loss_sum):
                bar.close()
                raise UserError(f"loss became {loss_sum} at step {step}: stopped; {out} keeps the last "
                                f"good checkpoint (try a lower --lr)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tok_s = tokens_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            bar.update()
            log({"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": round(tok_s, 1),
                 "time_s": round(time.time() - t0, 2), **getattr(loss_fn, "pop_stats", dict)()})
            if args.eval_every and (step % args.eval_every == 0 or step == total):
                evaluate()
            if args.save_every and step % args.save_every == 0:
                save()
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
    save()
    if world > 1:
        dist.destroy_process_group()
    say(f"{'interrupted: ' if interrupted else ''}saved {out} at step {step} "
          f"({aligner.n_params():,} parameters); metrics in {metrics_path}")
    if interrupted:
        sys.exit(130)
    return aligner


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    a = p.add_argument
    a("--data", required=True, help="Alpaca-style JSON or JSONL file")
    a("--model", help="converted base model directory (default: the embedded SmolLM2-135M-Instruct)")
    a("--out", default="out.pt", help="adapter file to write (and to --resume from)")
    a("--tokens", type=int, default=1, help="number of shared Aligner tokens N")
    a("--start-layer", type=int, default=2, help="first layer that attends to the Aligner")
    a("--per-layer", action="store_true", help="one prompt per layer: the LLaMA-Adapter baseline")
    a("--init", help="start from this adapter (for --dpo: the SFT Aligner, also the reference)")
    a("--epochs", type=float, default=8, help="passes over the training data")
    a("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--max-time", type=float, help="stop after this many seconds of training (and save)")
    a("--batch-size", type=int, default=64, help="examples per optimizer step")
    a("--micro-batch-size", type=int, default=8, help="examples per forward pass (gradient accumulation)")
    a("--lr", type=float, default=None, help="peak learning rate (default 9e-3; 1e-4 with --dpo)")
    a("--weight-decay", type=float, default=0.02, help="AdamW weight decay on the Aligner tensors")
    a("--warmup-epochs", type=float, default=2, help="linear warmup length in epochs")
    a("--warmup-steps", type=int, help="linear warmup length in optimizer steps (overrides --warmup-epochs)")
    a("--schedule", choices=["constant", "cosine"], default="constant", help="lr after warmup")
    a("--max-seq-len", type=int, default=512, help="truncate examples to this many tokens")
    a("--full-text", action="store_true", help="loss on the whole text, as the official data prep (default: response only)")
    a("--raw", action="store_true", help="no Alpaca template: instruction (+ input) as plain text")
    a("--val-fraction", type=float, default=0.05, help="share of the data held out for validation")
    a("--eval-every", type=int, default=50, help="evaluate every this many steps (0: never)")
    a("--eval-batches", type=int, default=4, help="micro-batches per validation estimate")
    a("--save-every", type=int, default=100, help="write the checkpoint every this many steps (0: only at the end)")
    a("--resume", action="store_true", help="continue from the checkpoint at --out")
    a("--seed", type=int, default=1337, help="random seed (initialisation, split, batches)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="base model dtype; auto: bfloat16 on cuda, float32 elsewhere")
    a("--compile", action="store_true", help="torch.compile the model's forward")
    a("--sdpa", action="store_true", help="causal attention through scaled_dot_product_attention (faster, same result)")
    a("--activation-checkpointing", action="store_true",
      help="recompute each layer's activations in backward: far less memory, about a third more time")
    a("--shard", action="store_true", help="under torchrun: shard the frozen base across processes (FSDP2)")
    a("--dpo", action="store_true", help="Direct Preference Optimization on {chosen, rejected} pairs")
    a("--beta", type=float, default=0.1, help="DPO temperature beta")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.lr is None:
        args.lr = 1e-4 if args.dpo else 9e-3
    try:
        train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
