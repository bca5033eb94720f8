"""Train an Aligner on a frozen LLaMA: a plain loop, the official recipe as defaults.

    python train.py --tokens 1 --data alpaca.json                 # embedded default model
    python train.py --model checkpoints/llama-2-7b --data alpaca_data.json --out alpaca-1tok.pt
    python train.py --dpo --data prefs.json --init alpaca-1tok.pt  # value alignment (DPO, dpo.py)

Recipe (official finetune/aligner.py): AdamW lr 9e-3, weight decay 0.02, batch 64 = micro-batch 8
x 8 accumulation, 8 epochs, warmup 2 epochs then constant, sequence length 512. Only the Aligner's
few thousand numbers train: the base is frozen and never copied, and so is the optimizer state
tiny. The output file holds the Aligner (with optimizer state and step for --resume) and is
written atomically; generate.py reads it directly.

The file reads top to bottom: the config, the schedule and the loss, set-up, one optimizer step,
evaluation and saving, the loop. Under torchrun, support/parallel.py adds one gradient sum per step.
Read next: dpo.py (the loss that --dpo puts in place of `sft_loss`), then support/README.md.
"""
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from aligner import Aligner
from data import IGNORE, Batch, batch_indices, collate, load_examples, split
from generate import Sampling, generate
from model import Transformer
from support import parallel
from support.adapter_file import RunFiles, load_aligner
from support.checkpoint import load_base
from support.errors import UserError
from support.flags import (Runtime, check_flags, count, flag, fraction, non_negative_float, run_command,
                           path_text, positive_float, positive_int, random_seed, epoch_count, step_count)
from support.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    """One training run; `python train.py --help` lists the same fields as flags."""
    data: str = flag(None, "Alpaca-style JSON or JSONL file", path_text, required=True)
    model: str = flag(None, "converted base model directory (default: the embedded SmolLM2)", path_text)
    out: str = flag("out.pt", "adapter to write (and --resume); metrics go to OUT.metrics.jsonl", path_text)
    tokens: int = flag(1, "number of shared Aligner tokens N", positive_int)
    start_layer: int = flag(2, "first layer that attends to the Aligner", count)
    per_layer: bool = flag(False, "one prompt per layer: the LLaMA-Adapter baseline")
    init: str = flag(None, "start from this adapter (with --dpo: also the reference policy)", path_text)
    epochs: float = flag(8, "passes over the training data", epoch_count)
    max_steps: int = flag(None, "optimizer steps (overrides --epochs)", step_count)
    max_time: float = flag(None, "stop after this many seconds of training (and save)", positive_float)
    batch_size: int = flag(64, "examples per optimizer step", positive_int)
    micro_batch_size: int = flag(8, "examples per forward pass (gradient accumulation)", positive_int)
    lr: float = flag(None, "peak learning rate (default 9e-3; 1e-4 with --dpo)", positive_float)
    weight_decay: float = flag(0.02, "AdamW weight decay on the Aligner tensors", non_negative_float)
    warmup_epochs: float = flag(2, "linear warmup length in epochs", non_negative_float)
    warmup_steps: int = flag(None, "linear warmup in optimizer steps (overrides --warmup-epochs)", count)
    schedule: str = flag("constant", "lr after warmup", choices=["constant", "cosine"])
    max_seq_len: int = flag(None, "truncate examples to this many tokens (default: 512, or the model's "
                            "context if shorter)", positive_int)
    full_text: bool = flag(False, "loss on the whole text, as the official data prep (default: the response)")
    template: str = flag("alpaca", "prompts: the paper's Alpaca template, raw text, or chat (the model's own "
                         "chat template; multi-turn data)", choices=["alpaca", "raw", "chat"])
    val_fraction: float = flag(0.05, "share of the data held out for validation", fraction)
    eval_every: int = flag(50, "evaluate every this many steps (0: never)", count)
    eval_batches: int = flag(4, "micro-batches per validation estimate", positive_int)
    save_every: int = flag(100, "write the checkpoint every this many steps (0: only at the end)", count)
    resume: bool = flag(False, "continue from the checkpoint at --out")
    seed: int = flag(1337, "random seed (initialisation, split, batches)", random_seed)
    activation_checkpointing: bool = flag(False, "recompute activations in backward: less memory, more time")
    shard: bool = flag(False, "under torchrun: shard the frozen base across processes (FSDP2)")
    dpo: bool = flag(False, "Direct Preference Optimization on {chosen, rejected} pairs (dpo.py)")
    beta: float = flag(0.1, "DPO temperature beta", positive_float)
    quiet: bool = flag(False, "no progress bar")

    def __post_init__(self):
        """Each flag's own check (as the command line does), then the combinations."""
        check_flags(self)
        self.lr = self.lr or (1e-4 if self.dpo else 9e-3)
        if self.batch_size % self.micro_batch_size:
            raise UserError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                            f"{self.micro_batch_size}")
        if self.template == "chat" and (self.dpo or self.full_text):
            raise UserError("--template chat labels the assistant turns: it takes no --dpo or --full-text")
        if self.resume and not self.out:
            raise UserError("--resume continues the checkpoint at --out: name it")


def get_lr(step: int, cfg: TrainConfig, total_steps: int, warmup_steps: int) -> float:
    """1) linear warmup over `warmup_steps` optimizer steps (the official script counted
    micro-steps against optimizer steps, so its lr only ever reached about half the peak);
    2) then constant (the paper's recipe) or 3) cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sft_loss(model, aligner, batch: Batch):
    """(next-token cross-entropy over the labelled tokens, {} : no other statistics). The logits at
    t predict the token at t+1; only labelled positions reach the output projection."""
    labels = batch.labels[:, 1:]  # (B, T-1)
    keep = labels != IGNORE  # (B, T-1)
    logits = model(batch.ids[:, :-1], aligner, keep=keep)  # (n, vocab), n labelled positions
    return F.cross_entropy(logits, labels[keep]), {}


@dataclass
class Run:
    """What a run holds besides its config: made by `setup`, advanced by `train_step`."""
    model: Transformer  # the frozen base
    forward: Callable  # the model, or torch.compile(model)
    tok: Tokenizer  # the base's, from load_base
    aligner: Aligner  # what trains
    loss_fn: Callable  # (model, aligner, batch) -> (loss, statistics): sft_loss, or a dpo.DPOLoss
    collate: Callable  # (examples, pad id, device) -> Batch: data.collate, or dpo.collate_pairs
    optimizer: torch.optim.Optimizer
    train_set: list  # Examples (dpo.Pairs with --dpo)
    val: list
    ranks: parallel.Ranks  # this process among the torchrun processes
    files: RunFiles  # the checkpoint at --out and its metrics
    total: int  # optimizer steps
    warmup: int
    step: int = 0


# ---- set-up ----------------------------------------------------------------------------------------
def setup(cfg: TrainConfig, runtime: Runtime, model=None) -> Run:
    """Everything the loop needs; `model` is a base already loaded (demo.py reuses one)."""
    torch.manual_seed(cfg.seed)
    ranks = parallel.Ranks.join(runtime.pick_device(), cfg.shard)
    files = RunFiles(cfg.out, [cfg.data, cfg.init], cfg.model, cfg.resume, writer=ranks.rank == 0)  # checked
    if cfg.batch_size % (cfg.micro_batch_size * ranks.world):  # the config checked it for one process
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size "
                        f"{cfg.micro_batch_size} times the {ranks.world} process(es)")
    base = load_base(cfg.model, runtime, ranks.device, model, training=cfg)  # memory checked first
    model, tok, path = base
    checkpoint = files.checkpoint(resume_flags(cfg, path, runtime)) if cfg.resume else None
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.shard:
        ranks.shard(model)
    chat = base.chat() if cfg.template == "chat" else None  # the model's own template
    data, loss_fn, batcher = load_data(cfg, tok, path, model.args.max_seq_len, chat)
    val, train_set = split(data.examples, cfg.val_fraction, cfg.seed)
    aligner = make_aligner(cfg, model, path, checkpoint, runtime.quantize, chat).to(ranks.device)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
    forward = torch.compile(model) if runtime.compile else model
    run = Run(model, forward, tok, aligner, loss_fn, batcher, optimizer, train_set, val, ranks, files, total,
              warmup)
    if checkpoint is not None:
        checkpoint.restore(optimizer)  # its moments, each checked against its parameter
        run.step = checkpoint.step
    if ranks.rank == 0:
        print(describe(run, cfg, path, data))
    return run


def describe(run: Run, cfg: TrainConfig, path: Path, data) -> str:
    """What the run is, said before its loop: the model, the Aligner, the data and the schedule."""
    a, weight = run.aligner, run.model.output.weight
    return "\n".join([
        f"model {path} ({sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M parameters, frozen) on "
        f"{run.ranks.device}, {str(weight.dtype).removeprefix('torch.')}",
        f"Aligner: {a.n_tokens} token(s){' per layer' if a.per_layer else ''}, layers {a.start_layer}.."
        f"{run.model.args.n_layers - 1}: {a.n_params():,} trainable parameters",
        f"data {cfg.data}: {len(run.train_set)} train, {len(run.val)} validation examples; {data.truncated} "
        f"truncated to {cfg.max_seq_len} tokens, {data.dropped} dropped (no response token left)",
        f"{run.total} optimizer steps of {cfg.batch_size} examples ({cfg.batch_size // cfg.micro_batch_size}"
        f" x {cfg.micro_batch_size}), warmup {run.warmup}, lr {cfg.lr} {cfg.schedule}, "
        f"{run.ranks.world} process(es)"])


def load_data(cfg: TrainConfig, tok: Tokenizer, path: Path, context: int, chat=None):
    """(data, loss, batcher): examples (or conversations) for sft_loss, or with --dpo preference pairs
    for dpo.py's loss, whose reference policy is --init (or the base alone)."""
    cfg.max_seq_len = cfg.max_seq_len or min(512, context)  # the default, now that the context is known
    if cfg.max_seq_len > context:  # a sliding window shorter than the run's sequences is refused here
        raise UserError(f"--max-seq-len {cfg.max_seq_len} is past the context of {path}: {context} at most")
    if not cfg.dpo:
        data = load_examples(cfg.data, tok, cfg.max_seq_len, cfg.template, cfg.full_text, chat)
        return data, sft_loss, collate
    import dpo
    reference = load_aligner(cfg.init) if cfg.init else None
    pairs = dpo.load_pairs(cfg.data, tok, cfg.max_seq_len, cfg.template)
    return pairs, dpo.DPOLoss(reference, cfg.beta), dpo.collate_pairs


def resume_flags(cfg: TrainConfig, path: Path, runtime: Runtime) -> dict:
    """The flags that define the Aligner and its base: --resume must give what the checkpoint has."""
    return {"--tokens": cfg.tokens, "--start-layer": cfg.start_layer, "--per-layer": cfg.per_layer,
            "--model": str(path.resolve()), "--template": cfg.template, "--dpo": cfg.dpo,
            "--quantize": runtime.quantize, "--init": cfg.init}


def make_aligner(cfg: TrainConfig, model: Transformer, path: Path, checkpoint, quantize, chat) -> Aligner:
    """The Aligner to train: resumed, started from --init, or new (zero gates); `chat`: the Chat of
    --template chat, whose template the Aligner records."""
    meta = {"base": str(path.resolve()), "template": cfg.template, "mode": "dpo" if cfg.dpo else "sft",
            "data": Path(cfg.data).name, "quantize": quantize,
            **({"chat_template": chat.source} if chat else {})}
    try:  # a --start-layer past this model's layers, a base with an Aligner merged in, an --init of another
        if checkpoint is not None:
            aligner = checkpoint.aligner
        elif cfg.init:
            aligner = load_aligner(cfg.init, like=cfg)
            aligner.meta.update(meta)
        else:
            aligner = Aligner(model.args, cfg.tokens, cfg.start_layer, cfg.per_layer, meta)
        aligner.check_fits(model.args, str(path))
    except ValueError as e:
        raise UserError(str(e)) from None
    return aligner


# ---- one optimizer step, evaluation, saving --------------------------------------------------------
def train_step(run: Run, cfg: TrainConfig):
    """One optimizer step at the scheduled lr: this rank's share of the step's micro-batches, the
    gradients summed over ranks. Returns (loss, lr, token positions of all ranks, statistics)."""
    lr = get_lr(run.step, cfg, run.total, run.warmup)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    idx = batch_indices(len(run.train_set), cfg.batch_size, run.step, cfg.seed)
    accum, mb = cfg.batch_size // cfg.micro_batch_size, cfg.micro_batch_size  # over all ranks together
    loss_sum, n_seen, stats = 0.0, 0, []
    for m in range(run.ranks.rank, accum, run.ranks.world):  # this rank's share of the step
        batch = run.collate([run.train_set[i] for i in idx[m * mb: (m + 1) * mb]], run.tok.pad_id,
                            run.ranks.device)
        loss, batch_stats = run.loss_fn(run.forward, run.aligner, batch)
        (loss / accum).backward()  # the mean over the micro-batches
        loss_sum, n_seen = loss_sum + loss.item() / accum, n_seen + batch.ids.numel() * run.ranks.world
        stats.append(batch_stats)
    run.ranks.sum_grads(list(run.aligner.parameters()))
    loss_sum = run.ranks.all_sum(loss_sum)
    if not math.isfinite(loss_sum):
        raise UserError(f"loss became {loss_sum} at step {run.step}: stopped unsaved; --out holds the last "
                        f"good checkpoint if one was saved (try a lower --lr)")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if not all(torch.isfinite(p).all() for p in run.aligner.parameters()):
        raise UserError(f"the Aligner became NaN or infinite at step {run.step}: stopped unsaved; --out "
                        f"holds the last good checkpoint if one was saved (try a lower --lr)")
    run.step += 1
    return loss_sum, lr, n_seen, mean(stats)


def mean(rows: list) -> dict:
    """The mean of each statistic over the rows (dicts with the same keys)."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


@torch.no_grad()
def evaluate(run: Run, cfg: TrainConfig, bar):
    """The validation loss (mean over --eval-batches micro-batches) to the metrics file, and a
    greedy answer to a held-out prompt on screen."""
    if not run.val:
        return
    mb = cfg.micro_batch_size
    results = [run.loss_fn(run.forward, run.aligner, run.collate(run.val[i: i + mb], run.tok.pad_id,
                                                                 run.ranks.device))
               for i in range(0, min(len(run.val), cfg.eval_batches * mb), mb)]
    val_loss = sum(loss.item() for loss, _ in results) / len(results)
    run.files.log({"step": run.step, "val_loss": val_loss,
                   **{f"val_{k}": v for k, v in mean([s for _, s in results]).items()}})
    if run.ranks.rank == 0 and not cfg.shard:  # a sharded model decodes only with every rank: no sample
        ids = generate(run.model, run.val[0].prompt_ids, run.aligner,
                       Sampling(max_new_tokens=40, temperature=0.0), run.tok.eos_id)
        bar.write(f"step {run.step}: val loss {val_loss:.4f} | sample: {run.tok.decode(ids).strip()[:200]!r}")


def save(run: Run, cfg: TrainConfig):
    """The checkpoint at --out, atomically: the Aligner (what generate.py reads), the optimizer
    state and the step (what --resume reads), and the config; then the metrics up to this step.
    Only an Aligner whose loss on a training batch is finite is written: --out always holds the
    last good one, and OUT.metrics.jsonl the metrics of that one."""
    if not cfg.out:
        return
    with torch.no_grad():
        batch = run.collate(run.train_set[:cfg.micro_batch_size], run.tok.pad_id, run.ranks.device)
        loss = run.loss_fn(run.forward, run.aligner, batch)[0].item()
    if not math.isfinite(loss):
        raise UserError(f"the Aligner after step {run.step} gives loss {loss}: stopped without saving it; "
                        f"{cfg.out} keeps the last good checkpoint (try a lower --lr)")
    run.files.save(run.aligner, run.optimizer, run.step, cfg)  # then its metrics (on the first rank)


# ---- the loop ----------------------------------------------------------------------------------------
def loop(run: Run, cfg: TrainConfig) -> list:
    """Train until the last step, --max-time, Ctrl-C or SIGTERM; returns the signals that stopped it."""
    bar = tqdm(total=run.total, initial=run.step, desc="train", dynamic_ncols=True,
               disable=cfg.quiet or run.ranks.rank > 0)
    stop = []  # Ctrl-C (SIGINT) and SIGTERM finish the step, then the run saves and exits
    previous = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    t0, n_seen = time.time(), 0
    try:
        if cfg.eval_every and not cfg.resume:
            evaluate(run, cfg, bar)  # the starting point: the base model, or the --init Aligner
        while run.step < run.total and not should_stop(run, cfg, time.time() - t0, stop, bar):
            loss, lr, n, stats = train_step(run, cfg)
            n_seen += n
            tok_s = n_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            bar.update()
            run.files.log({"step": run.step, "loss": loss, "lr": lr, "tokens_per_s": round(tok_s, 1),
                           "time_s": round(time.time() - t0, 2), **stats})
            if cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == run.total):
                evaluate(run, cfg, bar)
            if cfg.save_every and run.step % cfg.save_every == 0:
                save(run, cfg)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()
    return stop


def should_stop(run: Run, cfg: TrainConfig, seconds: float, stop: list, bar) -> bool:
    """A signal, or --max-time used up; every rank agrees, so that all stop at the same step."""
    out_of_time = bool(cfg.max_time) and seconds > cfg.max_time
    if out_of_time:
        bar.write(f"stopping at step {run.step}: --max-time {cfg.max_time}s reached")
    return run.ranks.all_sum(float(bool(stop) or out_of_time)) > 0


def train(cfg: TrainConfig, runtime: Runtime = Runtime(), model=None) -> Run:
    """Set up, loop, save. Returns the finished Run (its aligner, its model); after saving, raises the
    signal that stopped the run again: Ctrl-C's KeyboardInterrupt, SIGTERM to the command's handler."""
    run = setup(cfg, runtime, model)
    with run.files:  # the metrics staged while the run lives
        stop = loop(run, cfg)
        save(run, cfg)
    run.ranks.finish()
    if run.ranks.rank == 0 and cfg.out:
        said = "terminated: " if signal.SIGTERM in stop else "interrupted: " if stop else ""
        print(f"{said}saved {cfg.out} at step {run.step} "
              f"({run.aligner.n_params():,} parameters); metrics in {run.files.metrics}")
    if stop:
        signal.raise_signal(signal.SIGTERM if signal.SIGTERM in stop else signal.SIGINT)
    return run


def main(argv=None):
    run_command(train, argv, __doc__, TrainConfig, Runtime)


if __name__ == "__main__":
    main()
