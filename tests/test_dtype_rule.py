"""The one dtype rule of the decoding commands (support/flags.py decode_dtype): --dtype auto is bfloat16 on
a GPU or a CPU with bfloat16 units, float32 elsewhere; --dtype chooses; training keeps float32 on a CPU;
the adapter a bfloat16 base trains is the same kind of file as a float32 base's.

Run: .venv/bin/python -m pytest -q tests/test_dtype_rule.py
Read next: tests/test_bench.py.
"""
import json

import pytest
import torch

import generate
import serve
import support.flags as flags
import train
from aligner import Aligner
from support.adapter_file import load_aligner, save_aligner
from support.checkpoint import load_model
from support.flags import DecodeRuntime, Runtime, decode_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("units", [True, False])
def test_auto_is_bfloat16_exactly_where_the_hardware_has_it(monkeypatch, units):
    monkeypatch.setattr(flags, "bfloat16_units", lambda device: units)
    want = torch.bfloat16 if units else torch.float32
    assert decode_dtype("cpu") == str(want)[6:] and DecodeRuntime().pick_dtype(CPU) == want
    assert decode_dtype("cuda") == "bfloat16"  # on a GPU always, as before
    assert DecodeRuntime(dtype="float32").pick_dtype(CPU) == torch.float32  # the flag chooses
    assert DecodeRuntime(dtype="bfloat16").pick_dtype(CPU) == torch.bfloat16
    assert Runtime().pick_dtype(CPU) == torch.float32  # training's default is not this rule


def test_generate_and_serve_load_the_base_in_the_rules_dtype(monkeypatch, tiny, tmp_path):
    """generate.py's and serve.py's command lines end in a base of the rule's dtype, and --dtype wins."""
    seen = []
    monkeypatch.setattr(flags, "bfloat16_units", lambda device: True)
    monkeypatch.setattr(generate, "answer", lambda model, *a, **k: seen.append(model.output.weight.dtype))
    base = ["--model", str(tiny[1]), "--no-adapter", "--prompt", "x", "--device", "cpu"]
    generate.main(base)
    generate.main(base + ["--dtype", "float32"])
    monkeypatch.setattr(serve, "serve", lambda cfg, runtime: seen.append(runtime.pick_dtype(CPU)))
    a = Aligner(load_model(tiny[1]).args, 1)
    a.meta["base"] = str(tiny[1])
    save_aligner(a, tmp_path / "a.pt")
    serve.main(["--adapter", str(tmp_path / "a.pt")])
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16]


def tensors(obj, at="") -> dict:
    """{path: (shape, dtype)} of every tensor in a file's nested dicts and lists."""
    if torch.is_tensor(obj):
        return {at: (tuple(obj.shape), obj.dtype)}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{at}/{key}").items()}


def test_the_adapter_file_is_the_same_either_way(tiny, tmp_path):
    """Trained on a bfloat16 base or a float32 one: the same names, shapes and float32 tensors."""
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"Name item {i}.", "output": f"Item {i}."} for i in range(8)]))
    files = {}
    for dtype in ("bfloat16", "float32"):
        files[dtype] = tmp_path / f"{dtype}.pt"
        train.main(["--model", str(tiny[1]), "--data", str(data), "--out", str(files[dtype]), "--batch-size", "4",
                    "--micro-batch-size", "4", "--max-steps", "2", "--val-fraction", "0", "--quiet",
                    "--device", "cpu", "--dtype", dtype])
    layout = {dtype: tensors(torch.load(f, weights_only=True)) for dtype, f in files.items()}
    assert layout["bfloat16"] == layout["float32"] and layout["float32"]
    assert {v for _, v in layout["float32"].values()} == {torch.float32}
    meta = {dtype: {k: v for k, v in load_aligner(f).meta.items() if k != "base"} for dtype, f in files.items()}
    assert meta["bfloat16"].keys() == meta["float32"].keys()
