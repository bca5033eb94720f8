"""Speed and memory of ours against Hugging Face transformers + PEFT, same weights, same process.

    python bench.py --device cpu --size tiny
    python bench.py --device cpu --size smollm2-135m --dtype both   # float32 and bfloat16, each vs its peers
    python bench.py --device cuda --size llama-2-7b --batch 8 --seq 512 [--compile]

Random weights with the named size's shapes (no download). Alternating rounds of:
  train     forward + backward + AdamW on the Aligner only (PEFT: AdaptionPrompt with adapter_len
            N on the top L-2 layers, as close to Aligner as PEFT allows), tokens/s;
  generate  greedy decoding at batch 1 (transformers' generate for the peer), new tokens/s.
Each dtype is measured against transformers in the same dtype (--dtype both: float32 and bfloat16 in one
run, interleaved). It first prints the CPU features it found (the bfloat16 units that --dtype auto
follows). On CUDA it also prints peak memory and the training step's model-FLOPs utilisation against a
bf16 matmul rate measured here. The last lines compare them, one per dtype:
  summary float32: train xR1 vs transformers+peft, generate xR2 vs transformers
A benchmark, not a test: tests/test_bench.py only checks that it runs.
Read next: experiments/form_vs_knowledge.py, then tests/.
"""
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner import Aligner
from convert_weights import hf_layout
from data import IGNORE, Batch
from generate import Sampling, generate_batch
from model import CONFIGS, Transformer
from support.errors import UserError, run_main
from support.flags import (DTYPES, QUANTIZE, bfloat16_units, check_flags, decode_dtype, device_name, flag,
                           fraction, parse_flags, positive_int)
from support.hf import hf_state
from support.quantize import onednn_for_cpu, quantize_base, storage_bytes
from train import sft_loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(args, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, 1.0 if "norm" in name else 0.0, 0.02)
    return model.to(dtype).requires_grad_(False).eval()


def peer_model(model, n_tokens, device, dtype):
    """transformers' LlamaForCausalLM with our weights, wrapped in PEFT's AdaptionPrompt."""
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = {k: v for k, v in model.state_dict().items()
            if not (model.args.tie_embeddings and k == "output.weight")}
    state, config = hf_state(model.args, hf_layout(model.args, ours))
    config.pop("architectures"), config.pop("model_type")
    config.pop("torch_dtype")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build it directly in dtype (a 7B model in fp32 would take 27 GB)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    hf.load_state_dict(state, strict=False)
    hf.requires_grad_(False).eval()
    peft = get_peft_model(hf, AdaptionPromptConfig(adapter_len=n_tokens,
                                                   adapter_layers=model.args.n_layers - 2,
                                                   task_type="CAUSAL_LM"))
    return hf, peft


def make_batch(cfg, vocab: int, device) -> Batch:
    """Random ids with labels on the response part only: the first `cfg.prompt` of each sequence is
    prompt, labelled IGNORE, as in instruction data."""
    ids = torch.randint(0, vocab, (cfg.batch, cfg.seq + 1), device=device)  # (B, T+1)
    labels = ids.clone()  # (B, T+1)
    labels[:, : int(cfg.prompt * (cfg.seq + 1))] = IGNORE
    return Batch(ids, labels)


def train_steps(step_fn, params, n, batch: Batch, device):
    """(forward, backward, optimizer) seconds for each of n steps of step_fn(batch) + AdamW on params."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        loss = step_fn(batch)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return times


def matmul_tflops(device):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    sync(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def train_flops_per_token(args, seq, start, labelled):
    """Forward through every layer, and the head where there is a label (the `labelled` share of
    positions); backward for activations (no weight gradients) through layers start.. and that
    head: 2 FLOPs per weight per token each way, plus attention. The work the loss needs."""
    qkvo = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    per_layer = 2 * (qkvo + 3 * args.dim * args.hidden_dim)
    attn = 2 * 2 * seq * args.dim  # q k^T and att v, causal half counted as whole (as is common)
    head = 2 * args.dim * args.vocab_size * labelled
    fwd = args.n_layers * (per_layer + attn) + head
    bwd = (args.n_layers - start) * (per_layer + 2 * attn) + head
    return fwd + bwd


@dataclass
class BenchConfig:
    device: str = flag("cpu", "cpu or cuda", device_name)
    size: str = flag("tiny", "model shapes (random weights)",
                     choices=["tiny", "smollm2-135m", "llama-2-7b", "llama-2-13b"])
    tokens: int = flag(1, "Aligner tokens N", positive_int)
    batch: int = flag(8, "training batch", positive_int)
    seq: int = flag(128, "training sequence length", positive_int)
    new_tokens: int = flag(64, "tokens generated per decoding round", positive_int)
    gen_batch: int = flag(32, "prompts (of mixed lengths) in the batched decoding round", positive_int)
    rounds: int = flag(3, "alternating rounds of each measurement", positive_int)
    steps: int = flag(3, "training steps per round", positive_int)
    dtype: str = flag("auto", "auto: generate.py's default (bfloat16 on a GPU or a CPU with bfloat16 units, "
                      "else float32); both: float32 and bfloat16",
                      choices=["auto", "both", "float32", "bfloat16"])
    compile: bool = flag(False, "torch.compile our training forward and decoding step")
    attention: str = flag("einsum", "our causal attention (einsum: the default of train.py and generate.py)",
                          choices=["einsum", "sdpa"])
    prompt: float = flag(0.6, "share of each sequence that is prompt, with no label (the bundled data: "
                              "38 of 61 tokens)", fraction)
    activation_checkpointing: bool = flag(False, "recompute our layers in backward")
    quantize: str = flag("none", "our frozen layers in 8 or 4 bits (needs torchao)", choices=QUANTIZE)
    no_peer: bool = flag(False, "skip transformers + PEFT")

    def __post_init__(self):
        check_flags(self)


class Contender:
    """One implementation under test: a training step, its trainable parameters, and decode(prompts),
    which answers a batch of prompts greedily and returns the new tokens per second, all rows together."""

    def __init__(self, name, step, params, decode, dtype="float32"):
        self.name, self.step, self.params, self.decode, self.dtype = name, step, params, decode, dtype
        self.train, self.mem = [], 0.0  # (forward, backward, optimizer) seconds per step; peak GiB
        self.gen = {}  # batch size -> tokens/s per round


def timed(device, fn):
    sync(device)
    t = time.perf_counter()
    n = fn()
    sync(device)
    return n / (time.perf_counter() - t)


def ours(cfg, model, aligner, device, dtype: str):
    forward = torch.compile(model) if cfg.compile else model
    decode_step = torch.compile(model, dynamic=False) if cfg.compile else None
    greedy = Sampling(max_new_tokens=cfg.new_tokens, temperature=0)

    def train_step(batch):
        return sft_loss(forward, aligner, batch)[0]

    def decode(prompts):
        return timed(device, lambda: sum(map(len, generate_batch(model, prompts, aligner, greedy,
                                                                 forward=decode_step))))

    return Contender("ours", train_step, list(aligner.parameters()), decode, dtype)


def peers(cfg, hf, peft, device, dtype: str):
    """transformers + PEFT, and transformers' generate with the adapter switched off (bare)."""
    def train_step(batch):
        logits = peft(input_ids=batch.ids[:, :-1]).logits  # (B, T, vocab)
        labels = batch.labels[:, 1:].flatten()  # (B * T,)
        return F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE)

    def decode(prompts, bare=False):
        """transformers' own batched generate, left-padded with an attention mask."""
        n = max(map(len, prompts))
        ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts], device=device)  # (B, P)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, P)
        if bare:
            peft.base_model.disable_adapter_layers()

        def n_new():
            n_tok = cfg.new_tokens
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_tok, min_new_tokens=n_tok,
                              do_sample=False, eos_token_id=None, pad_token_id=0)  # (B, P + new)
            return (out.shape[1] - n) * len(prompts)

        with torch.no_grad():
            tok_s = timed(device, n_new)
        if bare:
            peft.base_model.enable_adapter_layers()
        return tok_s

    params = [q for q in peft.parameters() if q.requires_grad]
    return [Contender("peer", train_step, params, decode, dtype),
            Contender("bare", None, [], lambda prompts: decode(prompts, bare=True), dtype)]


def measure(cfg, contenders, weights, vocab, device):
    """Alternating rounds; round 0 warms up (and compiles) and is not counted."""
    batch = make_batch(cfg, vocab, device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist()  # mixed lengths, 8 to 64 tokens
               for n in torch.randint(8, 65, (cfg.gen_batch,), generator=g)]
    for r in range(cfg.rounds + 1):
        for c in contenders:
            if c.step is not None:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                n_steps = 1 if r == 0 else cfg.steps
                times = train_steps(c.step, c.params, n_steps, batch, device)
                if device.type == "cuda":  # all models live in this process: leave out the others' weights
                    other = sum(w for key, w in weights.items() if key != (c.name, c.dtype))
                    c.mem = max(c.mem, (torch.cuda.max_memory_allocated() - other) / 2**30)
                c.train += times if r > 0 else []
            for size in sorted({1, cfg.gen_batch}):
                tok_s = c.decode(prompts[:size])
                c.gen.setdefault(size, []).extend([tok_s] if r > 0 else [])


def report(cfg, contenders, model, device):
    rate = matmul_tflops(device) if device.type == "cuda" else None
    labelled = 1 - int(cfg.prompt * (cfg.seq + 1)) / cfg.seq
    flops = train_flops_per_token(model.args, cfg.seq, 2, labelled)
    header(cfg, model, device, labelled)
    if rate:
        print(f"bf16 matmul measured: {rate:.0f} TFLOP/s; training step {flops / 1e9:.2f} GFLOP/token "
              f"-> ceiling {rate * 1e12 / flops:,.0f} tokens/s")
    b = cfg.gen_batch
    print(f"{'':36}{'train tok/s':>12}{'decode b=1':>12}{f'b={b} total':>13}{'per row':>9}"
          f"{'peak GiB':>10}{'MFU':>6}")
    med = {(c.name, c.dtype): row(cfg, c, flops, rate, device) for c in contenders}
    for c in (c for c in contenders if c.name == "ours"):
        split = [1000 * statistics.median(t[i] for t in c.train) for i in range(3)]
        _, one, many = med["ours", c.dtype]
        print(f"ours {c.dtype}, one step: forward {split[0]:.0f} ms, backward {split[1]:.0f} ms, "
              f"optimizer {split[2]:.1f} ms; batch {b} decoding x{many / one:.1f} the total tokens/s "
              f"of batch 1")
    summaries(med, b)


def row(cfg, c: Contender, flops: float, rate, device) -> tuple:
    """Print one contender's line of the table; return its medians (train, decode b=1, b=gen_batch)."""
    labels = {"ours": "ours (model.py)", "peer": "transformers + PEFT", "bare": "transformers, no adapter"}
    b = cfg.gen_batch
    tr = statistics.median(cfg.batch * cfg.seq / sum(t) for t in c.train) if c.train else None
    m = (tr, statistics.median(c.gen[1]), statistics.median(c.gen[b]))
    mfu = f"{100 * tr * flops / (rate * 1e12):.0f}%" if rate and tr else "-"
    mem = f"{c.mem:.1f}" if device.type == "cuda" and tr else "-"
    train_col = f"{tr:,.0f}" if tr else "-"
    print(f"{f'{labels[c.name]}, {c.dtype}':<36}{train_col:>12}{m[1]:>12,.1f}{m[2]:>13,.1f}"
          f"{m[2] / b:>9,.1f}{mem:>10}{mfu:>6}")
    return m


def summaries(med: dict, b: int):
    """One line per dtype against the peers in that dtype, and bfloat16 against float32 (ours)."""
    for dtype in dict.fromkeys(d for _, d in med):
        ours, peer, bare = (med.get((name, dtype)) for name in ("ours", "peer", "bare"))
        if peer:
            print(f"summary {dtype}: train x{ours[0] / peer[0]:.2f} vs transformers+peft, "
                  f"generate x{ours[1] / bare[1]:.2f} vs transformers (batch 1), "
                  f"x{ours[2] / peer[2]:.2f} vs transformers+peft (batch {b})")
    if ("ours", "float32") in med and ("ours", "bfloat16") in med:
        bf, f32 = med["ours", "bfloat16"], med["ours", "float32"]
        print(f"ours bfloat16 vs ours float32: train x{bf[0] / f32[0]:.2f}, generate x{bf[1] / f32[1]:.2f} "
              f"(batch 1), x{bf[2] / f32[2]:.2f} (batch {b})")


def hardware(device) -> str:
    """The processor features that decide the dtype (support/flags.py bfloat16_units) and the speed."""
    found = [name[4:-10] for name in ("_is_avx2_supported", "_is_avx512_supported", "_is_vnni_supported",
                                      "_is_avx512_bf16_supported", "_is_amx_tile_supported")
             if getattr(torch.cpu, name, lambda: False)()]
    return (f"CPU: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"kernels {torch.backends.cpu.get_cpu_capability()}, features: {' '.join(found) or 'none'}; "
            f"bfloat16 units on {device.type}: {'yes' if bfloat16_units(device) else 'no'}")


def header(cfg, model, device, labelled):
    options = [o for o, on in (("compiled", cfg.compile), (f"{cfg.attention} attention", True),
                               ("activation checkpointing", cfg.activation_checkpointing)) if on]
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n{cfg.size} ({size:.1f}M), {device}, "
          f"torch {torch.__version__}, batch {cfg.batch} x {cfg.seq} ({100 * labelled:.0f}% labelled), "
          f"{cfg.tokens} Aligner token(s)"
          + "".join(f", {o}" for o in options))


def contenders_in(cfg, margs, device, dtype: str, weights: dict) -> list:
    """Ours, transformers + PEFT and bare transformers, all in `dtype`, on the same random weights."""
    model = random_model(margs, device, DTYPES[dtype])
    model.use_sdpa(cfg.attention == "sdpa")
    model.activation_checkpointing = cfg.activation_checkpointing
    aligner = Aligner(margs, cfg.tokens).to(device)
    with torch.no_grad():
        aligner.gates.normal_(0, 0.1)  # non-zero: the prefix path really runs
    contenders = []
    if not cfg.no_peer:  # the peer copies our weights before they are quantized
        try:
            hf, peft = peer_model(model, cfg.tokens, device, DTYPES[dtype])
            contenders += peers(cfg, hf, peft, device, dtype)
            weights["peer", dtype] = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
        except ImportError:
            print("transformers/peft not installed: measuring ours only")
    quantize_base(model, cfg.quantize)
    if cfg.quantize == "none" and not cfg.compile:
        onednn_for_cpu(model)  # as load_base decodes: float32 on a CPU through oneDNN's kernel
    weights["ours", dtype] = sum(storage_bytes(t) for t in {id(p): p for p in model.parameters()}.values())
    print(f"our weights, {dtype}: {weights['ours', dtype] / 2**30:.2f} GiB ({cfg.quantize} quantization "
          f"of the layers)")
    return [ours(cfg, model, aligner, device, dtype), *contenders], model


def bench(cfg: BenchConfig):
    device = torch.device(cfg.device)
    dtypes = {"both": ["float32", "bfloat16"], "auto": [decode_dtype(device)]}.get(cfg.dtype, [cfg.dtype])
    margs = CONFIGS[cfg.size]
    if cfg.seq + 1 > margs.max_seq_len or cfg.new_tokens + 64 > margs.max_seq_len:
        raise UserError(f"--seq {cfg.seq} (+1) and --new-tokens {cfg.new_tokens} (after prompts of up to 64) "
                        f"must fit the {cfg.size} context of {margs.max_seq_len}")
    if int(cfg.prompt * (cfg.seq + 1)) >= cfg.seq:
        raise UserError(f"--prompt {cfg.prompt} leaves no labelled position in --seq {cfg.seq}: lower it")
    print(hardware(device))
    contenders, weights = [], {}
    for dtype in dtypes:
        more, model = contenders_in(cfg, margs, device, dtype, weights)
        contenders += more
    measure(cfg, contenders, weights, margs.vocab_size, device)
    report(cfg, contenders, model, device)


def main(argv=None):
    run_main(lambda: bench(*parse_flags(argv, __doc__, BenchConfig)))


if __name__ == "__main__":
    main()
