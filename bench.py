"""Speed and memory of ours against Hugging Face transformers + PEFT, same weights, same process.

    python bench.py --device cpu --size tiny
    python bench.py --device cpu --size smollm2-135m
    python bench.py --device cuda --size llama-2-7b --batch 8 --seq 512 [--compile]

Random weights with the named size's shapes (no download). Alternating rounds of:
  train     forward + backward + AdamW on the Aligner only (PEFT: AdaptionPrompt with adapter_len
            N on the top L-2 layers, as close to Aligner as PEFT allows), tokens/s;
  generate  greedy decoding at batch 1 (transformers' generate for the peer), new tokens/s.
On CUDA it also prints peak memory and the training step's model-FLOPs utilisation against a
bf16 matmul rate measured here. The last line compares the two:
  summary: train xR1 vs transformers+peft, generate xR2 vs transformers
A benchmark, not a test: tests/test_bench.py only checks that it runs.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from aligner import Aligner
from convert_weights import hf_state
from model import CONFIGS, Transformer
from generate import generate


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

    state, config = hf_state(model.args, {k: v for k, v in model.state_dict().items()
                                          if not (model.args.tie_embeddings and k == "output.weight")})
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
    peft = get_peft_model(hf, AdaptionPromptConfig(adapter_len=n_tokens, adapter_layers=model.args.n_layers - 2,
                                                   task_type="CAUSAL_LM"))
    return hf, peft


def train_steps(step_fn, params, n, batch, seq, vocab, device):
    """Seconds per step over n steps of step_fn(ids, labels) + AdamW on params."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)  # (B, T+1)
    times = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        loss = step_fn(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
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


def train_flops_per_token(args, seq, start):
    """Forward through every layer and the head; backward for activations (no weight gradients)
    through layers start.. and the head: 2 FLOPs per weight per token each way, plus attention."""
    per_layer = 2 * (args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * args.dim * args.hidden_dim)
    attn = 2 * 2 * seq * args.dim  # q k^T and att v, causal half counted as whole (as is common)
    head = 2 * args.dim * args.vocab_size
    fwd = args.n_layers * (per_layer + attn) + head
    bwd = (args.n_layers - start) * (per_layer + 2 * attn) + head
    return fwd + bwd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", default="tiny", choices=["tiny", "smollm2-135m", "llama-2-7b", "llama-2-13b"],
                   help="model shapes (random weights)")
    p.add_argument("--tokens", type=int, default=1, help="Aligner tokens N")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--seq", type=int, default=128, help="training sequence length")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decoding round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each measurement")
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile our training forward and decoding step")
    p.add_argument("--sdpa", action="store_true", help="our causal attention through scaled_dot_product_attention")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute our layers in backward")
    p.add_argument("--no-peer", action="store_true", help="skip transformers + PEFT")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    margs = CONFIGS[args.size]
    model = random_model(margs, device, dtype)
    model.use_sdpa(args.sdpa)
    model.activation_checkpointing = args.activation_checkpointing
    aligner = Aligner(margs, args.tokens).to(device)
    with torch.no_grad():
        aligner.gates.normal_(0, 0.1)  # non-zero: the prefix path really runs
    peer = None
    if not args.no_peer:
        try:
            peer = peer_model(model, args.tokens, device, dtype)
        except ImportError:
            print("transformers/peft not installed: measuring ours only")
    forward = torch.compile(model) if args.compile else model
    step = torch.compile(model, dynamic=False) if args.compile else None

    def ours_step(x, y):
        logits = forward(x, aligner)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def peer_step(x, y):
        logits = peer[1](input_ids=x).logits  # (B, T, vocab)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    prompt = torch.randint(0, margs.vocab_size, (16,)).tolist()

    def ours_generate():
        sync(device)
        t = time.perf_counter()
        n = len(list(generate(model, prompt, aligner, args.new_tokens, temperature=0, step=step)))
        sync(device)
        return n / (time.perf_counter() - t)

    def peer_generate(bare):
        """transformers' generate, through PEFT's adapted attention or (bare) with it switched off."""
        ids = torch.tensor([prompt], device=device)
        if bare:
            peer[1].base_model.disable_adapter_layers()
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = peer[0].generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
        sync(device)
        if bare:
            peer[1].base_model.enable_adapter_layers()
        return (out.shape[1] - len(prompt)) / (time.perf_counter() - t)

    rows = {name: {"train": [], "gen": [], "mem": 0.0} for name in ("ours", "peer", "bare")}
    weights = {"ours": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
               "peer": sum(t.numel() * t.element_size() for t in peer[0].state_dict().values()) if peer else 0}
    runs = [("ours", ours_step, list(aligner.parameters()), ours_generate)]
    if peer is not None:
        runs.append(("peer", peer_step, [q for q in peer[1].parameters() if q.requires_grad], lambda: peer_generate(False)))
    for r in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for name, fn, params, gen in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = train_steps(fn, params, 1 if r == 0 else args.steps, args.batch, args.seq, margs.vocab_size, device)
            if device.type == "cuda":
                other = weights["peer" if name == "ours" else "ours"]  # both models live in this process
                rows[name]["mem"] = max(rows[name]["mem"], (torch.cuda.max_memory_allocated() - other) / 2**30)
            tok_s = gen()
            if r > 0:
                rows[name]["train"] += [args.batch * args.seq / t for t in times]
                rows[name]["gen"].append(tok_s)
        if peer is not None and r > 0:
            rows["bare"]["gen"].append(peer_generate(True))
    rate = matmul_tflops(device) if device.type == "cuda" else None
    flops = train_flops_per_token(margs, args.seq, 2)
    print(f"\n{args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), {str(dtype)[6:]}, {device}, "
          f"torch {torch.__version__}, batch {args.batch} x {args.seq}, {args.tokens} Aligner token(s)"
          f"{', compiled' if args.compile else ''}{', sdpa' if args.sdpa else ''}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}")
    if rate:
        print(f"bf16 matmul measured: {rate:.0f} TFLOP/s; training step {flops / 1e9:.2f} GFLOP/token "
              f"-> ceiling {rate * 1e12 / flops:,.0f} tokens/s")
    print(f"{'':26}{'train tokens/s':>16}{'generate tokens/s':>19}{'peak GiB':>10}{'MFU':>7}")
    med = {}
    for name, label in (("ours", "ours (model.py)"), ("peer", "transformers + PEFT"), ("bare", "transformers, no adapter")):
        if not rows[name]["gen"]:
            continue
        ge = statistics.median(rows[name]["gen"])
        tr = statistics.median(rows[name]["train"]) if rows[name]["train"] else None
        med[name] = (tr, ge)
        mfu = f"{100 * tr * flops / (rate * 1e12):.0f}%" if rate and tr else "-"
        mem = f"{rows[name]['mem']:.1f}" if device.type == "cuda" and tr else "-"
        print(f"{label:<26}{f'{tr:,.0f}' if tr else '-':>16}{ge:>19,.1f}{mem:>10}{mfu:>7}")
    if "peer" in med:
        print(f"summary: train x{med['ours'][0] / med['peer'][0]:.2f} vs transformers+peft, "
              f"generate x{med['ours'][1] / med['bare'][1]:.2f} vs transformers")


if __name__ == "__main__":
    main()
