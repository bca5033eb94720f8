"""A complete LLaMA in one file, with the Aligner prefix path beside its attention.

Aligner (Zhou et al. 2023, arXiv 2312.05503) freezes the base model and learns N "prefix
tokens" shared by every layer. Every layer l >= start_layer (2 by default) attends to them
through its own frozen wk/wv, with a softmax of their own, scales that by a per-head gate
and adds it to the ordinary causal attention output, before wo:

    x --norm--> q, k, v --RoPE--> softmax(q k^T) v ----------------(+)--> wo --> residual
                |                                                   ^
                +--> softmax(q pk^T) pv  (pk, pv = P wk^T, P wv^T)  |  times gate[l, head]
                     no RoPE, no norm: the prefix has no position --+

Everything else is Meta's LLaMA (RMSNorm, interleaved RoPE, SwiGLU, grouped-query
attention), with Meta's parameter names so that Meta checkpoints load without renaming.
Shapes: B batch, T positions, S cached positions, D width, H query heads, K key/value heads,
E head width, N Aligner tokens (lower case inside Attention.forward, where they are einsum letters).

Use: `model = Transformer(CONFIGS["tiny"])` (random weights), or a converted checkpoint with
`support.checkpoint.load_model(dir)`; then `logits = model(ids, aligner=None)`: token ids (B, T) ->
logits (B, T, vocab). Decoding passes a cache in: `cache = model.new_cache(batch, max_len, aligner)`,
then `model(ids, aligner, pos, cache=cache)` one step at a time (generate.py).
Read next: aligner.py (the trainable part).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 4096  # model width D
    n_layers: int = 32  # L
    n_heads: int = 32  # query heads H
    n_kv_heads: int = 32  # key/value heads K (K < H: grouped-query attention)
    vocab_size: int = 32000
    hidden_dim: int = 11008  # feed-forward width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # output projection shares tok_embeddings' weight
    # Beyond LLaMA-2, the defaults plain LLaMA-2: a merged Aligner, Qwen2, LLaMA-3.1 (read from the files)
    wo_bias_from: int = -1  # layers from this one on get a bias on wo (a merged Aligner); -1: none
    qkv_bias: bool = False  # biases on wq, wk, wv (Qwen2)
    rope_factor: float = 1.0  # LLaMA-3.1's RoPE scaling (see scaled_frequencies); 1: none
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFIGS = {  # named sizes; convert_weights.py reads the real ones from the checkpoint
    "llama-2-7b": ModelArgs(),
    "llama-2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "llama-2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    "tinyllama-1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                                max_seq_len=2048),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                              hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192,
                              tie_embeddings=True),
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=1024, hidden_dim=768,
                      max_seq_len=1024),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), in fp32 as Meta does, then back to x's dtype, times the weight
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight  # (..., D)


def rope(pos, head_dim: int, theta: float, args=None):
    """cos and signed sin of the angles pos * theta^(-2i/E) for positions pos (B, T), each
    (B, T, 1, E), fp32, laid out for Meta's interleaved pairs: rotating (x0, x1) gives
    (x0 cos - x1 sin, x1 cos + x0 sin). Computed from positions on every call (it is tiny), so
    no buffer can be rounded by .to(bf16). With `args` whose rope_factor is not 1, LLaMA-3.1's scaling."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)  # (E/2,)
    if args is not None and args.rope_factor != 1:
        inv_freq = scaled_frequencies(inv_freq, args)  # (E/2,)
    angle = pos.float()[..., None] * inv_freq  # (B, T, E/2)
    cos = angle.cos().repeat_interleave(2, -1)  # (B, T, E): cos, cos for each pair
    sin = torch.stack((-angle.sin(), angle.sin()), -1).flatten(-2)  # (B, T, E): -sin, +sin for each pair
    return cos[..., None, :], sin[..., None, :]  # (B, T, 1, E) each


def scaled_frequencies(inv_freq, args: ModelArgs):
    """LLaMA-3.1's RoPE scaling, for a context longer than the one the model was first trained at,
    in three bands: slow rotations (wavelength > original context / low_freq_factor), which a long
    context would turn past any angle seen in training, are slowed by rope_factor; fast ones
    (wavelength < original context / high_freq_factor), which carry local order, are kept; those
    between are a smooth blend of the two."""
    wavelength, context = 2 * math.pi / inv_freq, args.rope_original_context  # (E/2,), scalar
    low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
    smooth = (context / wavelength - low) / (high - low)  # (E/2,): 0 at the slow edge, 1 at the fast
    blend = (1 - smooth) * inv_freq / args.rope_factor + smooth * inv_freq  # (E/2,)
    slow, fast = wavelength > context / low, wavelength < context / high  # (E/2,) each
    return torch.where(slow, inv_freq / args.rope_factor, torch.where(fast, inv_freq, blend))  # (E/2,)


def apply_rope(x, cos, sin):
    """Rotate each consecutive pair (x0, x1) of the head width by its angle."""
    xf = x.float()  # (B, T, heads, E)
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (B, T, heads, E): (x1, x0) pairs
    return (xf * cos + swapped * sin).type_as(x)  # (B, T, heads, E)


class KVCache:
    """One layer's keys and values of the positions seen so far, for decoding a batch of rows one token
    at a time, and `aligner_kv`: its Aligner keys/values, computed once per batch (they do not depend
    on the input). Training uses no cache: there they come from the Aligner's current tokens."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (B, S, K, E)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (B, S, K, E)
        if self.k.is_cuda:  # CUDA graphs (generate.py --compile) then keep them in place, not copied
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)
        self.aligner_kv = None  # (pk, pv), each (N, K, E) or (B, N, K, E), or None without an Aligner

    def update(self, pos, xk, xv):
        b = xk.shape[0]
        rows = slice(b) if pos.dim() == 1 else torch.arange(b, device=pos.device)[:, None]  # all, or (B, 1)
        self.k[rows, pos] = xk  # (B, T, K, E) written at positions pos: (T,) for all rows, or (B, T)
        self.v[rows, pos] = xv
        return self.k[:b], self.v[:b]  # (B, S, K, E) each, S = max_len


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        has_bias = 0 <= args.wo_bias_from <= layer_id
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=has_bias)
        self.sdpa = False  # True: the causal part through F.scaled_dot_product_attention (same result)

    def prefix_kv(self, tokens, dtype):
        """The Aligner tokens through this layer's frozen wk, wv (biases included): no norm, no RoPE."""
        tokens = tokens.to(dtype)  # (N, D), or (B, N, D) with one Aligner per row
        pk = self.wk(tokens).unflatten(-1, (self.n_kv_heads, self.head_dim))  # (N, K, E) or (B, N, K, E)
        pv = self.wv(tokens).unflatten(-1, (self.n_kv_heads, self.head_dim))  # (N, K, E) or (B, N, K, E)
        return pk, pv

    def forward(self, x, pos, rope, mask, prefix=None, cache=None):
        # Legend: b batch, t query positions, s key positions, h query heads, k key/value heads,
        # g query heads per key/value head (h = k * g), e head width, n Aligner tokens.
        b, t, _ = x.shape
        k_heads, g, e = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        # QKV
        xq = self.wq(x).view(b, t, self.n_heads, e)  # (b, t, h, e)
        xk = self.wk(x).view(b, t, k_heads, e)  # (b, t, k, e)
        xv = self.wv(x).view(b, t, k_heads, e)  # (b, t, k, e)
        xq, xk = apply_rope(xq, *rope), apply_rope(xk, *rope)  # positions enter here only
        if cache is not None:
            xk, xv = cache.update(pos, xk, xv)  # (b, s, k, e): every cached position
        xq = xq.view(b, t, k_heads, g, e)  # grouped-query: query head h = kv head * g + group index
        # causal attention; mask (b, 1, 1, t, s) is 0 where key s is visible from query t, else -inf
        if self.sdpa:
            y = F.scaled_dot_product_attention(xq.flatten(2, 3).transpose(1, 2), xk.transpose(1, 2),
                                               xv.transpose(1, 2), mask[:, :, 0].type_as(xq), enable_gqa=True)
            y = y.transpose(1, 2).view(b, t, k_heads, g, e)  # (b, t, k, g, e)
        else:
            scores = torch.einsum("btkge,bske->bkgts", xq, xk) / math.sqrt(e)  # (b, k, g, t, s)
            att = (scores.float() + mask).softmax(-1).type_as(xq)  # (b, k, g, t, s), softmax in fp32
            y = torch.einsum("bkgts,bske->btkge", att, xv)  # (b, t, k, g, e)
        # Aligner: the shared tokens, with a softmax of their own, gated per head
        if prefix is not None:
            tokens, gate = prefix  # (n, D) and (h,) for the whole batch, or (b, n, D) and (b, h) per row
            pk, pv = self.prefix_kv(tokens, x.dtype) if cache is None else cache.aligner_kv  # [b,] n, k, e
            pk, pv = pk.expand(b, *pk.shape[-3:]), pv.expand(b, *pv.shape[-3:])  # (b, n, k, e) each
            p_scores = torch.einsum("btkge,bnke->bkgtn", xq, pk) / math.sqrt(e)  # (b, k, g, t, n)
            p_att = p_scores.float().softmax(-1).type_as(xq)  # (b, k, g, t, n) over the n tokens
            py = torch.einsum("bkgtn,bnke->btkge", p_att, pv)  # (b, t, k, g, e)
            y = y + gate.to(y.dtype).expand(b, self.n_heads).view(b, 1, k_heads, g, 1) * py  # (b, t, k, g, e)
        return self.wo(y.reshape(b, t, -1))  # (b, t, D)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, D) via (B, T, hidden_dim)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, pos, rope, mask, prefix=None, cache=None):
        h = x + self.attention(self.attention_norm(x), pos, rope, mask, prefix, cache)  # (B, T, D)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, T, D)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.activation_checkpointing = False  # train.py --activation-checkpointing

    def forward(self, ids, aligner=None, pos=None, keep=None, cache=None):
        """Token ids (B, T) -> logits (B, T, vocab). Without a cache the ids are whole sequences from
        position 0. With a `cache` (new_cache: decoding), `pos` (T,), or (B, T) with each row at its
        own columns, says which columns of the cache the ids fill, and each row's left padding is
        masked and shifts its positions. With `keep`, a (B, T) mask, only the kept positions get
        logits, (n, vocab): a loss that needs no more saves the vocabulary projection (a fifth of a
        small model's work)."""
        if cache is not None and aligner is not cache.aligner:
            raise ValueError("the KV cache holds the keys/values of another Aligner (or of none): "
                             "make it with new_cache(batch, max_len, aligner) for the one you decode with")
        pos = torch.arange(ids.shape[1], device=ids.device) if pos is None else pos  # (T,)
        if cache is not None:
            pad, n_keys = cache.pad[: ids.shape[0]], cache.layers[0].k.shape[1]  # (B,) left padding; S
        else:
            pad, n_keys = torch.zeros(1, dtype=torch.long, device=ids.device), ids.shape[1]  # (1,): none; S
        mask = causal_mask(pos, n_keys, pad)  # (B, T, S)
        a = self.args
        cos_sin = rope(pos - pad[:, None], a.head_dim, a.rope_theta, a)  # (B, T, 1, E) each
        h = self.tok_embeddings(ids)  # (B, T, D)
        caches = cache.layers if cache is not None else [None] * len(self.layers)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, caches)):
            prefix = aligner.prefix(i) if aligner is not None else None  # None below start_layer
            args = (h, pos, cos_sin, mask[:, None, None], prefix, layer_cache)  # mask (B, 1, 1, T, S)
            if self.activation_checkpointing and torch.is_grad_enabled():  # recompute in backward
                h = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)  # (B, T, D)
            else:
                h = layer(*args)  # (B, T, D)
        h = self.norm(h) if keep is None else self.norm(h[keep])  # (B, T, D) or (n, D)
        return self.output(h).float()  # (B, T, vocab) or (n, vocab)

    def use_sdpa(self, on: bool = True):
        """Route the causal attention through F.scaled_dot_product_attention (fused kernels) instead
        of the einsum lines; the Aligner path stays einsum. tests/ check that both agree."""
        for layer in self.layers:
            layer.attention.sdpa = on

    @torch.no_grad()
    def new_cache(self, batch: int, max_len: int, aligner=None, pad=None, reuse=None) -> "Cache":
        """A Cache for a batch of rows up to `max_len` long, each left-padded by pad (B,) columns, with
        each layer's Aligner keys/values computed here, once per batch. `reuse`: a Cache whose buffers
        are large enough lends them (their contents are overwritten as decoding goes)."""
        p = self.output.weight
        size = (batch, max_len, self.args.n_kv_heads, self.args.head_dim)  # (B, S, K, E)
        fits = reuse is not None and all(have >= need for have, need in zip(reuse.layers[0].k.shape, size))
        layers = reuse.layers if fits else [KVCache(*size, p.dtype, p.device) for _ in self.layers]
        for i, (layer, layer_cache) in enumerate(zip(self.layers, layers)):
            prefix = aligner.prefix(i) if aligner is not None else None
            layer_cache.aligner_kv = None if prefix is None else layer.attention.prefix_kv(prefix[0], p.dtype)
        pad = torch.zeros(batch, dtype=torch.long) if pad is None else pad  # (B,)
        return Cache(layers, pad.to(p.device), aligner)


@dataclass
class Cache:
    """What decoding passes to forward: a KVCache per layer, the rows' left padding, their Aligner."""
    layers: list  # a KVCache per layer
    pad: torch.Tensor  # (B,)
    aligner: object = None


def causal_mask(pos, n_keys: int, pad):
    """0 where key s is visible from query t, else -inf, (B, T, S), for queries at pos (T,) or (B, T) in
    rows left-padded by pad (B,): s <= t and s no padding (a padding query sees itself alone)."""
    keys = torch.arange(n_keys, device=pos.device)  # (S,)
    at = pos[..., None]  # (T, 1) or (B, T, 1)
    visible = (at >= keys) & ((keys >= pad[:, None, None]) | (at == keys))  # (B, T, S)
    return torch.zeros(visible.shape, device=pos.device).masked_fill(~visible, float("-inf"))  # (B, T, S)
