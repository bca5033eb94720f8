"""Will it fit? The bytes a training or generation run needs at least, against the memory there is,
checked before the model or the data is loaded: a size too large for this machine is one line
with both numbers, not a traceback from an allocation (or the kernel's OOM killer) minutes later.

    check_training(cfg, model_dir, runtime, device, loaded=False)  # load_base(training=cfg), before loading
    total = checked_length(model, lengths, batch_size, sampling)   # generate.py, before the KV cache

The estimate is a floor, so that it never refuses a run that fits (b: bytes per number of the base,
4 for float32, 2 for bfloat16; D width, K*E key/value width, F feed-forward width, H heads, V vocab,
L layers, s the Aligner's start layer, N its tokens, B the micro-batch, T a sequence):

    weights     P * b   (P from the sizes; 1/2 byte a number when quantized; 0 if already loaded)
    Aligner     4 * N' * D * 4        (float32 values, gradients and AdamW's two moments;
                                       N' = N, or N * (L - s) per layer)
    activations (L - s) * B * T * (2D + 2F) * b   (what backward keeps at the least with the base
                                               frozen: the two norms' inputs, the feed-forward's two
                                               halves; layers s.. only, as only they lead to the Aligner)
    attention   (L - s) * B * H * T * (T' + N) * b        (the probabilities; T' = T with the einsum
                                                           attention, 0 with sdpa's fused kernels)
    logits      B * V * 4                                 (one labelled position a row)
    indices     16 * batch size                           (the step's example indices)

T is 16 tokens (2 with --template raw; the context, if shorter): the Alpaca and chat templates'
headers alone are longer, so the floor holds for every data set. Generation, with the model loaded
and the prompts read (B rows, the longest prompt n tokens, T = n + new tokens, at most the context):

    KV cache 2 * L * B * T * K*E * b  +  the prefill's logits B * n * V * 4  +  its mask B * n * T * 4

Available: on CUDA the device's free memory (torch.cuda.mem_get_info); on a CPU MemAvailable plus
free swap (/proc/meminfo), or the cgroup's limit less its use when that is less; elsewhere no check.
Not run on its own. Read next: outputs.py.
"""
from pathlib import Path

import torch

from support.checkpoint import read_params
from support.errors import UserError

GIB = 2**30
SHORTEST = 16  # tokens: a sequence no shorter than this is assumed


def n_params(args) -> int:
    """The base model's numbers, from its sizes."""
    kv = args.n_kv_heads * args.head_dim
    layer = 2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.hidden_dim + 2 * args.dim
    return args.n_layers * layer + args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) + args.dim


def base_bytes(args, runtime, device) -> tuple:
    """(bytes of the weights, bytes per activation number) of the base on `device`."""
    width = torch.empty((), dtype=runtime.pick_dtype(device)).element_size()
    return n_params(args) * (width if runtime.quantize == "none" else 0.5), width


def training_bytes(cfg, args, runtime, device, loaded=False) -> int:
    """The floor (see above) of a training run's memory."""
    weights, b = base_bytes(args, runtime, device)
    gated = max(1, args.n_layers - cfg.start_layer)
    n_total = cfg.tokens * (gated if cfg.per_layer else 1)
    t, mb = min(2 if cfg.template == "raw" else SHORTEST, args.max_seq_len), cfg.micro_batch_size
    activations = gated * mb * t * (2 * args.dim + 2 * args.hidden_dim) * b
    causal = t if runtime.attention == "einsum" else 0
    attention = gated * mb * args.n_heads * t * (causal + cfg.tokens) * b
    return int((0 if loaded else weights) + 16 * n_total * args.dim + activations + attention
               + mb * args.vocab_size * 4 + 16 * cfg.batch_size)


def generation_bytes(model, rows: int, n: int, total: int) -> int:
    """What decoding `rows` prompts of up to `n` tokens to `total` tokens allocates (see above)."""
    args, b = model.args, model.output.weight.element_size()
    cache = 2 * args.n_layers * rows * total * args.n_kv_heads * args.head_dim * b
    return cache + rows * n * args.vocab_size * 4 + rows * n * total * 4


def available(device: torch.device):
    """Bytes free for this run on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu" or not Path("/proc/meminfo").is_file():
        return None
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text()
            .splitlines() if line.split()[1:2] and line.split()[1].isdigit()}
    if "MemAvailable" not in info:
        return None
    free = info["MemAvailable"] + info.get("SwapFree", 0)
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.is_file() and used.is_file() and limit.read_text().strip().isdigit():
        free = min(free, int(limit.read_text()) - int(used.read_text()))
    return free


def check_fits(need: int, device: torch.device, what: str, hint: str):
    have = available(torch.device(device))
    if have is not None and need > have:
        raise UserError(f"{what} needs at least {need / GIB:,.1f} GiB on {device}, and {have / GIB:,.1f} "
                        f"GiB are free: {hint}")


def check_training(cfg, path, runtime, device, loaded=False):
    """Refuse a training configuration (a train.TrainConfig) whose floor exceeds the free memory."""
    args = read_params(Path(path) / "params.json")
    check_fits(training_bytes(cfg, args, runtime, device, loaded), device,
               f"training {cfg.tokens:,} token(s) in micro-batches of {cfg.micro_batch_size:,} "
               f"(batch {cfg.batch_size:,})", "lower --micro-batch-size, --batch-size or --tokens")


def check_generation(model, rows: int, n: int, total: int):
    """Refuse a batch whose KV cache and prefill do not fit beside the loaded model."""
    check_fits(generation_bytes(model, rows, n, total), model.output.weight.device,
               f"decoding {rows:,} rows of {total:,} tokens (prompts up to {n:,})",
               "lower --batch-size or --max-new-tokens")


def checked_length(model, lengths: list, batch_size: int, sampling) -> int:
    """The tokens a batch of these prompt lengths decodes to (the longest prompt and the new tokens,
    at most the context), once `check_generation` says a batch of them fits."""
    total = min(max(lengths) + sampling.max_new_tokens, model.args.max_seq_len)
    check_generation(model, min(batch_size, len(lengths)), max(lengths), total)
    return total
