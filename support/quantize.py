"""The frozen base in 8 or 4 bits (torchao, optional), swapped in after loading; and in float32 on a
CPU, its products for decoding through oneDNN's kernel.

    model = quantize_base(load_model(path), "int8")   # or "nf4"; "none" leaves it as it is
    model = onednn_for_cpu(model)                      # load_base does it for float32 decoding on a CPU
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


class OneDNNLinear(torch.nn.Linear):
    """nn.Linear, the same x W^T + b on the same weight, computed without gradients by oneDNN's float32
    linear instead of F.linear's MKL kernel: on this project's 2-core AMD CPU it reads the large weights
    (w1, w3, the output projection) 1.2x to 1.9x as fast and the smallest (wk, wv) slower, and a float32
    decoding step is little else (benchmarks/linear_kernels.py, docs/performance.md). With gradients on
    (training) it is nn.Linear's own forward."""

    def forward(self, x):
        if torch.is_grad_enabled():
            return super().forward(x)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none",
                                               [None], "")  # (rows, out)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


def onednn_for_cpu(model):
    """Every nn.Linear of a float32 model on a CPU made a OneDNNLinear: the same module, parameters and
    all (nothing copied); only the kernel of its products without gradients differs. Left as it is on
    a GPU, in another dtype, or where torch has no oneDNN or has it turned off."""
    weight = model.output.weight
    if weight.dtype is not torch.float32 or weight.device.type != "cpu" \
            or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return model
    for linear in [m for m in model.modules() if type(m) is torch.nn.Linear]:
        linear.__class__ = OneDNNLinear
    return model


def storage_bytes(t) -> int:
    """Bytes a tensor really holds: a quantized tensor subclass counts its inner tensors (packed
    data, scales), not the shape it stands for."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(storage_bytes(getattr(t, n)) for n in names)
