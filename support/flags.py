"""Command-line flags declared once, as dataclass fields, and checked where they are parsed.

    @dataclass
    class TrainConfig:
        tokens: int = flag(1, "number of shared Aligner tokens N", positive_int)
    cfg, runtime = parse_flags(argv, __doc__, TrainConfig, Runtime)
    run_command(train, argv, __doc__, TrainConfig, Runtime)   # main(): train(cfg, runtime) under run_main

Each field is a flag: `flag(default, help, type)` keeps argparse's own `type` (which converts the
text and refuses impossible values: usage line, "error: ...", exit 2) and its other options; a
field whose default is False is a switch. `check_flags` runs the same types on a config built in
Python, so that it is refused where the command line would be. Also here: the Runtime flags that
every command running a model shares, and the one table of dtypes.
Not run on its own. Read next: inputs.py.
"""
import argparse
import math
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from support.errors import UserError, run_main

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def flag(default, help: str, type=None, **argparse_options):
    """A config field that is also a command-line flag: its default, --help text and argparse type."""
    return field(default=default, metadata={"help": help, "type": type, **argparse_options})


def parse_flags(argv, doc: str, *configs):
    """One instance of each dataclass in `configs`, all from one command line."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in (f for cls in configs for f in fields(cls)):
        options = {k: v for k, v in f.metadata.items() if v is not None}
        name = "--" + f.name.replace("_", "-")
        if f.default is False:
            p.add_argument(name, action="store_true", help=options["help"])
            continue
        if f.default is not None and "action" not in options:
            options["help"] += f" (default: {f.default})"
        p.add_argument(name, default=f.default, **options)
    values = vars(p.parse_args(argv))
    return [cls(**{f.name: values[f.name] for f in fields(cls)}) for cls in configs]


def run_command(work, argv, doc: str, *configs):
    """What every command's main() does: its configs from the command line (parse_flags), then
    work(*configs) under errors.run_main (bad input: one line on stderr, exit code 2)."""
    run_main(lambda: work(*parse_flags(argv, doc, *configs)))


def check_flags(config):
    """Every field's flag type and choices run on its value: a config made in Python is refused
    where the same command line would be."""
    for f in fields(config):
        value, check, choices = getattr(config, f.name), f.metadata.get("type"), f.metadata.get("choices")
        try:
            for v in (value if isinstance(value, list) else [value]) if value is not None else []:
                if check is not None:
                    check(v)
                if choices and v not in choices:
                    raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {v!r}")
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise UserError(f"--{f.name.replace('_', '-')}: {e}") from None


def _number(text, kind, ok, what):
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    try:
        value = kind(text)
    except (ValueError, TypeError, OverflowError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)) or kind is int and isinstance(text, float) and text != value:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text) -> int:
    return _number(text, int, lambda v: v >= 1, "a whole number >= 1")


MAX_STEPS, MAX_EPOCHS = 10**8, 10**4  # a budget past these is a typo: 10**8 steps of 0.1 s are a year


def step_count(text) -> int:
    return _number(text, int, lambda v: 1 <= v <= MAX_STEPS, f"a whole number from 1 to {MAX_STEPS:,}")


def epoch_count(text) -> float:
    return _number(text, float, lambda v: 0 < v <= MAX_EPOCHS, f"a number above 0 and at most {MAX_EPOCHS:,}")


def count(text) -> int:
    return _number(text, int, lambda v: v >= 0, "a whole number >= 0")


def random_seed(text) -> int:
    return _number(text, int, lambda v: 0 <= v < 2**31, "a whole number from 0 to 2147483647")


def positive_float(text) -> float:
    return _number(text, float, lambda v: v > 0, "a finite number > 0")


def non_negative_float(text) -> float:
    return _number(text, float, lambda v: v >= 0, "a finite number >= 0")


def fraction(text) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1")


def probability(text) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "a number above 0 and at most 1")


def path_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise argparse.ArgumentTypeError(f"must name a file, got {text!r}")
    return text


def device_name(text) -> str:
    """'auto', or a torch device that this machine has."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:1, mps)") from None
    have = {"cpu": True, "mps": torch.backends.mps.is_available(),
            "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()}
    if not have.get(device.type, False):
        raise argparse.ArgumentTypeError(f"this machine has no {text} device; use auto or cpu")
    return text


def bfloat16_units(device) -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU that supports it, an x86 CPU with
    AVX512-BF16 or AMX, an Arm CPU with the BF16 extension. Elsewhere bfloat16 is emulated (slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    x86 = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in x86):
        return True
    features = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return platform.machine() in ("aarch64", "arm64") and " bf16" in features


def decode_dtype(device) -> str:
    """The one rule for decoding's --dtype auto (generate.py, serve.py, demo.py): bfloat16 on a CUDA GPU
    or where bfloat16_units says the processor computes it natively, float32 elsewhere. The Aligner
    itself stays float32 either way, so its file is the same."""
    return "bfloat16" if torch.device(device).type == "cuda" or bfloat16_units(device) else "float32"


QUANTIZE = ["none", "int8", "nf4"]  # the frozen base's precision (support/quantize.py)


@dataclass
class Runtime:
    """Where and how the frozen base runs: the flags of every command that runs the model."""
    device: str = flag("auto", "auto (cuda, then mps, then cpu), or a torch device", device_name)
    dtype: str = flag("auto", "base model dtype; auto: bfloat16 on cuda, float32 elsewhere",
                      choices=["auto", *DTYPES])
    attention: str = flag("einsum", "einsum (the lines model.py spells out) or sdpa (fused kernels: the same "
                          "numbers, faster where they help, as on a GPU)", choices=["einsum", "sdpa"])
    quantize: str = flag("none", "the frozen layers in 8 or 4 bits (needs torchao)", choices=QUANTIZE)
    compile: bool = flag(False, "torch.compile the model (decoding on CUDA: with CUDA graphs)")

    def __post_init__(self):
        check_flags(self)

    def pick_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")

    def pick_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @staticmethod
    def for_decoding() -> type:
        """The Runtime of the commands that only decode (generate.py, serve.py): DecodeRuntime."""
        return DecodeRuntime


@dataclass
class DecodeRuntime(Runtime):
    """The Runtime of the commands that only decode (generate.py, serve.py): --dtype auto follows
    decode_dtype, bfloat16 on a CPU with bfloat16 units too (training keeps float32 there)."""
    dtype: str = flag("auto", "base model dtype; auto: bfloat16 on a GPU or a CPU with bfloat16 units "
                      "(AVX512-BF16, AMX, Arm BF16), float32 elsewhere", choices=["auto", *DTYPES])

    def pick_dtype(self, device: torch.device) -> torch.dtype:
        return DTYPES[decode_dtype(device) if self.dtype == "auto" else self.dtype]
