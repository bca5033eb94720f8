"""Train an Aligner on a frozen LLaMA: a plain loop, the official recipe as defaults.

    python train.py --tokens 1 --data alpaca.json                 # embedded default model
    python train.py --model checkpoints/llama-2-7b --data alpaca_data.json --out alpaca-1tok.pt
    python train.py --dpo --data prefs.json --init alpaca-1tok.pt  # value alignment (DPO)

Recipe (official finetune/aligner.py): AdamW lr 9e-3, weight decay 0.02, batch 64 = micro-batch 8
x 8 accumulation, 8 epochs, warmup 2 epochs then constant, sequence length 512. Only the Aligner's
few thousand numbers train: the base is frozen and never copied, and so is the optimizer state
tiny. The output file holds the Aligner (with optimizer state and step for --resume) and is
written atomically; generate.py reads it directly.

The file reads top to bottom: the config, the schedule and the loss, set-up, one optimizer step,
evaluation and saving, the loop. DPO (dpo.py) stands in for the loss with --dpo; several processes
(parallel.py) add one gradient sum per step under torchrun.
Read next: demo.py (all of it at work on the embedded model), then aligner.py's merge and inspect.
"""
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import parallel
from aligner import Aligner, load_file
from cli import (JsonLines, Runtime, UserError, atomic_save, check_flags, check_output_file, count, flag,
                 fraction, non_negative_float, parse_config, path_text, pick_device, pick_dtype,
                 positive_float, positive_int, random_seed, run_main)
from convert_weights import DEFAULT_MODEL_DIR, load_model, model_dir
from data import IGNORE, Batch, Tokenizer, batch_indices, collate, load_examples, split
from dpo import DPOLoss, load_pairs
from generate import Sampling, generate
from model import Transformer


@dataclass
class TrainConfig(Runtime):
    """One training run; `python train.py --help` lists the same fields as flags."""
    data: str = flag(None, "Alpaca-style JSON or JSONL file", path_text, required=True)
    model: str = flag(None, "converted base model directory (default: the embedded SmolLM2)", path_text)
    out: str = flag("out.pt", "adapter to write (and --resume); metrics go to OUT.metrics.jsonl", path_text)
    tokens: int = flag(1, "number of shared Aligner tokens N", positive_int)
    start_layer: int = flag(2, "first layer that attends to the Aligner", count)
    per_layer: bool = flag(False, "one prompt per layer: the LLaMA-Adapter baseline")
    init: str = flag(None, "start from this adapter (with --dpo: also the reference policy)", path_text)
    epochs: float = flag(8, "passes over the training data", positive_float)
    max_steps: int = flag(None, "optimizer steps (overrides --epochs)", positive_int)
    max_time: float = flag(None, "stop after this many seconds of training (and save)", positive_float)
    batch_size: int = flag(64, "examples per optimizer step", positive_int)
    micro_batch_size: int = flag(8, "examples per forward pass (gradient accumulation)", positive_int)
    lr: float = flag(None, "peak learning rate (default 9e-3; 1e-4 with --dpo)", positive_float)
    weight_decay: float = flag(0.02, "AdamW weight decay on the Aligner tensors", non_negative_float)
    warmup_epochs: float = flag(2, "linear warmup length in epochs", non_negative_float)
    warmup_steps: int = flag(None, "linear warmup in optimizer steps (overrides --warmup-epochs)", count)
    schedule: str = flag("constant", "lr after warmup", choices=["constant", "cosine"])
    max_seq_len: int = flag(512, "truncate examples to this many tokens", positive_int)
    full_text: bool = flag(False, "loss on the whole text, as the official data prep (default: the response)")
    raw: bool = flag(False, "no Alpaca template: instruction (+ input) as plain text")
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
        if self.lr is None:
            self.lr = 1e-4 if self.dpo else 9e-3
        if self.batch_size % self.micro_batch_size:
            raise UserError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                            f"{self.micro_batch_size}")
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


class SFTLoss:
    """Next-token cross-entropy over the labelled tokens: the logits at t predict the token at t+1.
    Only labelled positions reach the output projection (a prompt costs its layers, not its logits)."""

    collate = staticmethod(collate)

    def __call__(self, model, aligner, batch: Batch):
        labels = batch.labels[:, 1:]  # (B, T-1)
        keep = labels != IGNORE  # (B, T-1)
        logits = model(batch.ids[:, :-1], aligner, keep=keep)  # (n, vocab), n labelled positions
        return F.cross_entropy(logits, labels[keep])

    def pop_stats(self) -> dict:
        return {}


@dataclass
class Run:
    """What a run holds besides its config: made by `setup`, advanced by `train_step`."""
    model: Transformer  # the frozen base
    forward: object  # the model, or torch.compile(model)
    tok: Tokenizer
    aligner: Aligner  # None when the run trains other parameters (the experiment's LoRA)
    params: list  # what the optimizer trains
    loss_fn: object  # SFTLoss, or dpo.DPOLoss
    optimizer: torch.optim.Optimizer
    train_set: list  # Examples (dpo.Pairs with --dpo)
    val: list
    ranks: parallel.Ranks
    total: int  # optimizer steps
    warmup: int
    step: int = 0


# ---- set-up ----------------------------------------------------------------------------------------
def setup(cfg: TrainConfig, model=None, params=None) -> Run:
    """Everything the loop needs. `model` (already loaded) and `params` (trained instead of a new
    Aligner) are for callers that bring their own, as the LoRA baseline in experiments/ does."""
    if cfg.out:  # before any work: --out (and its metrics file) must not be one of the inputs
        model_files = list(Path(cfg.model or DEFAULT_MODEL_DIR).glob("*"))
        check_output_file(cfg.out, [cfg.data, cfg.init, *model_files], ".metrics.jsonl")
    torch.manual_seed(cfg.seed)
    ranks = parallel.setup(pick_device(cfg.device), cfg.shard)
    if cfg.batch_size % (cfg.micro_batch_size * ranks.world):  # the config checked it for one process
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size "
                        f"{cfg.micro_batch_size} times the {ranks.world} process(es)")
    checkpoint = read_checkpoint(cfg.out) if cfg.resume else None
    path = model_dir(cfg.model)
    model = load_base(cfg, path, ranks, model)
    tok = Tokenizer(path)
    data = load_data(cfg, tok)
    val, train_set = split(data.examples, cfg.val_fraction, cfg.seed)
    aligner = None if params is not None else make_aligner(cfg, model, path, checkpoint).to(ranks.device)
    params = list(aligner.parameters()) if params is None else params
    loss_fn = SFTLoss()
    if cfg.dpo:  # the reference policy: the starting Aligner (--init), or the base model alone
        loss_fn = DPOLoss(Aligner.load(cfg.init).to(ranks.device) if cfg.init else None, cfg.beta)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_epochs * steps_per_epoch)
    forward = torch.compile(model) if cfg.compile else model
    run = Run(model, forward, tok, aligner, params, loss_fn, optimizer, train_set, val, ranks, total, warmup)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        run.step = checkpoint["step"]
    describe(run, cfg, path, data)
    return run


def load_data(cfg: TrainConfig, tok: Tokenizer):
    template = "raw" if cfg.raw else "alpaca"
    return (load_pairs(cfg.data, tok, cfg.max_seq_len, template) if cfg.dpo
            else load_examples(cfg.data, tok, cfg.max_seq_len, template, cfg.full_text))


def read_checkpoint(path) -> dict:
    """A checkpoint that `save` wrote, for --resume."""
    d = load_file(path)
    if not isinstance(d.get("aligner"), dict) or "optimizer" not in d or "step" not in d:
        raise UserError(f"{path} is an adapter but not a training checkpoint of train.py, so it "
                        f"cannot be resumed; start a new run from it with --init {path}")
    return d


def load_base(cfg: TrainConfig, path: Path, ranks: parallel.Ranks, model=None) -> Transformer:
    """The frozen base (loaded here unless given) with the config's attention and memory options."""
    model = model or load_model(path, ranks.device, pick_dtype(cfg.dtype, ranks.device), cfg.quantize)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.use_sdpa(cfg.attention == "sdpa")
    if cfg.shard:
        parallel.shard_model(model)
    return model


def make_aligner(cfg: TrainConfig, model: Transformer, path: Path, checkpoint) -> Aligner:
    """The Aligner to train: resumed, started from --init, or new (zero gates)."""
    meta = {"base": str(path.resolve()), "template": "raw" if cfg.raw else "alpaca",
            "mode": "dpo" if cfg.dpo else "sft", "data": Path(cfg.data).name, "quantize": cfg.quantize}
    if checkpoint is not None:
        aligner = Aligner.from_dict(checkpoint["aligner"], cfg.out)
    elif cfg.init:
        aligner = Aligner.load(cfg.init)
        aligner.meta.update(meta)
    else:
        aligner = Aligner(model.args, cfg.tokens, cfg.start_layer, cfg.per_layer, meta)
    aligner.check_fits(model.args, str(path))
    return aligner


def describe(run: Run, cfg: TrainConfig, path: Path, data):
    if run.ranks.rank > 0:
        return
    a, n_layers, weight = run.aligner, run.model.args.n_layers, run.model.output.weight
    n_base = sum(p.numel() for p in run.model.parameters())
    print(f"model {path} ({n_base / 1e6:.1f}M parameters, frozen) on {run.ranks.device}, "
          f"{str(weight.dtype).removeprefix('torch.')}")
    what = (f"Aligner: {a.n_tokens} token(s){' per layer' if a.per_layer else ''}, layers "
            f"{a.start_layer}..{n_layers - 1}" if a is not None else "the parameters given")
    print(f"{what}: {sum(p.numel() for p in run.params):,} trainable parameters")
    print(f"data {cfg.data}: {len(run.train_set)} train, {len(run.val)} validation examples; "
          f"{data.truncated} truncated to {cfg.max_seq_len} tokens, {data.dropped} dropped (no response "
          f"token left)")
    accum = cfg.batch_size // cfg.micro_batch_size
    print(f"{run.total} optimizer steps of {cfg.batch_size} examples ({accum} x {cfg.micro_batch_size}), "
          f"warmup {run.warmup}, lr {cfg.lr} {cfg.schedule}, {run.ranks.world} process(es)")


# ---- one optimizer step, evaluation, saving --------------------------------------------------------
def train_step(run: Run, cfg: TrainConfig):
    """One optimizer step at the scheduled lr: this rank's share of the step's micro-batches, the
    gradients summed over ranks. Returns (loss, lr, token positions processed by all ranks)."""
    lr = get_lr(run.step, cfg, run.total, run.warmup)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    idx = batch_indices(len(run.train_set), cfg.batch_size, run.step, cfg.seed)
    accum, mb = cfg.batch_size // cfg.micro_batch_size, cfg.micro_batch_size  # over all ranks together
    loss_sum, n_seen = 0.0, 0
    for m in range(run.ranks.rank, accum, run.ranks.world):  # this rank's share of the step
        batch = run.loss_fn.collate([run.train_set[i] for i in idx[m * mb: (m + 1) * mb]], run.tok.pad_id,
                                    run.ranks.device)
        loss = run.loss_fn(run.forward, run.aligner, batch) / accum  # the mean over the micro-batches
        loss.backward()
        loss_sum += loss.item()
        n_seen += batch.ids.numel() * run.ranks.world
    parallel.sum_grads(run.params, run.ranks)
    loss_sum = parallel.all_sum(loss_sum, run.ranks)
    if not math.isfinite(loss_sum):
        raise UserError(f"loss became {loss_sum} at step {run.step}: stopped; {cfg.out} keeps the last "
                        f"good checkpoint (try a lower --lr)")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if not all(torch.isfinite(p).all() for p in run.params):
        raise UserError(f"the Aligner became NaN or infinite at step {run.step}: stopped; {cfg.out} keeps "
                        f"the last good checkpoint (try a lower --lr)")
    run.step += 1
    return loss_sum, lr, n_seen


@torch.no_grad()
def estimate_loss(run: Run, cfg: TrainConfig) -> float:
    """Mean loss over the first --eval-batches micro-batches of the validation set."""
    mb = cfg.micro_batch_size
    losses = [run.loss_fn(run.forward, run.aligner, run.loss_fn.collate(run.val[i: i + mb], run.tok.pad_id,
                                                                         run.ranks.device)).item()
              for i in range(0, min(len(run.val), cfg.eval_batches * mb), mb)]
    return sum(losses) / max(1, len(losses))


def evaluate(run: Run, cfg: TrainConfig, metrics: JsonLines, bar):
    """The validation loss to the metrics file, and a greedy answer to a held-out prompt on screen."""
    if not run.val:
        return
    val_loss = estimate_loss(run, cfg)
    metrics.write({"step": run.step, "val_loss": val_loss,
                   **{f"val_{k}": v for k, v in run.loss_fn.pop_stats().items()}})
    if run.ranks.rank == 0 and not cfg.shard:  # a sharded model decodes only with every rank: no sample
        ids = generate(run.model, run.tok.encode(run.val[0].prompt), run.aligner,
                       Sampling(max_new_tokens=40, temperature=0.0), run.tok.eos_id)
        bar.write(f"step {run.step}: val loss {val_loss:.4f} | sample: {run.tok.decode(ids).strip()[:200]!r}")


def save(run: Run, cfg: TrainConfig):
    """The checkpoint at --out, atomically: the Aligner (what generate.py reads), the optimizer
    state and the step (what --resume reads), and the config. Only an Aligner whose loss on a
    training batch is finite is written: --out always holds the last good one."""
    if not cfg.out or run.aligner is None:
        return
    with torch.no_grad():
        batch = run.loss_fn.collate(run.train_set[:cfg.micro_batch_size], run.tok.pad_id, run.ranks.device)
        loss = run.loss_fn(run.forward, run.aligner, batch).item()
        run.loss_fn.pop_stats()
    if not math.isfinite(loss):
        raise UserError(f"the Aligner after step {run.step} gives loss {loss}: stopped without saving it; "
                        f"{cfg.out} keeps the last good checkpoint (try a lower --lr)")
    if run.ranks.rank == 0:
        atomic_save({"aligner": run.aligner.to_dict(), "optimizer": run.optimizer.state_dict(),
                     "step": run.step, "config": asdict(cfg)}, cfg.out)


# ---- the loop ----------------------------------------------------------------------------------------
def loop(run: Run, cfg: TrainConfig) -> bool:
    """Train until the last step, --max-time or Ctrl-C; True if Ctrl-C stopped it."""
    # OUT.metrics.jsonl, a line per step and evaluation, by rank 0 alone; started afresh unless --resume
    path = Path(cfg.out).with_suffix(".metrics.jsonl") if cfg.out and run.ranks.rank == 0 else None
    metrics = JsonLines(path, fresh=not cfg.resume)
    bar = tqdm(total=run.total, initial=run.step, desc="train", dynamic_ncols=True,
               disable=cfg.quiet or run.ranks.rank > 0)
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    t0, n_seen = time.time(), 0
    try:
        if cfg.eval_every and not cfg.resume:
            evaluate(run, cfg, metrics, bar)  # the starting point: the base model, or the --init Aligner
        while run.step < run.total and not should_stop(run, cfg, time.time() - t0, interrupted, bar):
            loss, lr, n = train_step(run, cfg)
            n_seen += n
            tok_s = n_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            bar.update()
            metrics.write({"step": run.step, "loss": loss, "lr": lr, "tokens_per_s": round(tok_s, 1),
                           "time_s": round(time.time() - t0, 2), **run.loss_fn.pop_stats()})
            if cfg.eval_every and (run.step % cfg.eval_every == 0 or run.step == run.total):
                evaluate(run, cfg, metrics, bar)
            if cfg.save_every and run.step % cfg.save_every == 0:
                save(run, cfg)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
    return bool(interrupted)


def should_stop(run: Run, cfg: TrainConfig, seconds: float, interrupted: list, bar) -> bool:
    """Ctrl-C, or --max-time used up; every rank agrees, so that all stop at the same step."""
    out_of_time = bool(cfg.max_time) and seconds > cfg.max_time
    if out_of_time:
        bar.write(f"stopping at step {run.step}: --max-time {cfg.max_time}s reached")
    return parallel.all_sum(float(bool(interrupted) or out_of_time), run.ranks) > 0


def train(cfg: TrainConfig, model=None, params=None):
    """Set up, loop, save. Returns the trained Aligner (None when `params` were given); raises
    KeyboardInterrupt after saving when Ctrl-C stopped the run."""
    run = setup(cfg, model, params)
    interrupted = loop(run, cfg)
    save(run, cfg)
    parallel.finish(run.ranks)
    if run.ranks.rank == 0 and cfg.out:
        print(f"{'interrupted: ' if interrupted else ''}saved {cfg.out} at step {run.step} "
              f"({sum(p.numel() for p in run.params):,} parameters); metrics in "
              f"{Path(cfg.out).with_suffix('.metrics.jsonl')}")
    if interrupted:
        raise KeyboardInterrupt
    return run.aligner


def main(argv=None):
    run_main(lambda: train(parse_config(TrainConfig, argv, __doc__)))


if __name__ == "__main__":
    main()
