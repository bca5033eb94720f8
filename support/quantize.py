"""The frozen base in 8 or 4 bits (torchao, optional), swapped in after loading.

    model = quantize_base(load_model(path), "int8")   # or "nf4"; "none" leaves it as it is
    storage_bytes(tensor)                              # what a (quantized) tensor really holds

Not run on its own. Read next: convert.py (how a checkpoint of another format becomes a converted directory).
"""
import logging
import math

import torch

from support.errors import UserError


def quantize_base(model, mode: str):
    """Swap the attention and feed-forward weights of every layer (wq wk wv wo w1 w2 w3) for
    torchao's quantized tensors; embeddings, norms and the output head stay as they are, and so
    does model.py: its nn.Linear layers just hold other tensors. int8: weight-only int8 per output
    channel. nf4: QLoRA's 4-bit NormalFloat in blocks of 64 with quantized scales, whose linear
    passes gradients to its inputs, which is all an Aligner's training needs of a frozen base."""
    if mode == "none":
        return model
    for name in ("torchao", "torch.utils._pytree"):  # their import-time notices of kernels this build lacks
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401  (optional: only --quantize needs it)
    except ImportError:
        raise UserError(f"--quantize {mode} needs torchao: pip install torchao") from None
    linears = [m for layer in model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for linear in linears:
            quantize_(linear, Int8WeightOnlyConfig())
    else:
        try:
            from torchao.quantization import to_nf4  # torchao >= 0.17
        except ImportError:
            from torchao.dtypes import to_nf4

        if any(linear.weight.numel() % 64 for linear in linears):
            raise UserError("--quantize nf4 quantizes in blocks of 64 numbers, and a layer of this model has "
                            "a weight whose size is not a multiple of 64: use --quantize int8")
        for linear in linears:
            n_blocks = linear.weight.numel() // 64
            scaler_block = math.gcd(n_blocks, 256)  # scales are themselves quantized in blocks of this many
            nf4 = to_nf4(linear.weight.data, 64, scaler_block)
            linear.weight = torch.nn.Parameter(nf4, requires_grad=False)
    return model


def storage_bytes(t) -> int:
    """Bytes a tensor really holds: a quantized tensor subclass counts its inner tensors (packed
    data, scales), not the shape it stands for."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(storage_bytes(getattr(t, n)) for n in names)
