"""Bad input never costs a user a file, and always gets one clear line.

A table of bad inputs across the four command lines (train.py, generate.py, adapter.py,
convert_weights.py), each run as its own subprocess in a sandbox that holds a tiny model, data, an
existing adapter with its metrics file, and marker files in the current directory. Every case must
exit with code 2 and one line on stderr that names the problem (argparse's own usage errors keep
argparse's format: usage, then "prog: error: ..."), with no traceback, and the sandbox must be
byte for byte what it was. Then property-based tests (hypothesis) of the data reader and the
adapter loader: any input either loads or raises the project's UserError, nothing else.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL, ROOT, make_hf_model, make_tokenizer_json
from forkrun import shared
from test_model import nonzero_aligner
from test_train_generate import RECORDS

import train
from support import checkpoint
from adapter import merge
from support.adapter_file import from_state, load_aligner, save_aligner, to_dict
from support.errors import UserError
from support.temporary import atomic_write, new_directory
from support.checkpoint import load_model
from convert_weights import convert
from data import load_examples
from support.tokenizer import Tokenizer
from dpo import load_pairs

HAS_CUDA = torch.cuda.is_available()
OFFICIAL_7B = next(iter(sorted(OFFICIAL.glob("aligner1Token-llama2-7B*"))), None)


def write_adapter(path, d):
    torch.save(d, path)
    return path


def make_sandbox(box: Path, tiny_dir: Path):
    """The user's files: a model, data, an adapter and its metrics, marker files, and bad inputs."""
    shutil.copytree(tiny_dir, box / "model")
    (box / "data.json").write_text(json.dumps(RECORDS))
    (box / "work").mkdir()
    (box / "work" / "marker.txt").write_text("the user's notes")
    (box / "marker.txt").write_text("more of the user's notes")
    model = load_model(box / "model")
    good = nonzero_aligner(model.args, 1)
    good.meta["base"] = str(box / "model")
    save_aligner(good, box / "adapter.pt")
    (box / "adapter.metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    bad = box / "bad"
    bad.mkdir()
    (bad / "d.metrics.jsonl").write_text(json.dumps(RECORDS))
    (bad / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (bad / "surrogate.json").write_text('[{"instruction": "a\\ud800b", "output": "x"}]')
    (bad / "not_a_dir").write_text("a file where a folder is expected")
    (bad / "existing_dir").mkdir()
    (bad / "existing_dir" / "keep.txt").write_text("not ours")
    d = to_dict(good)
    write_adapter(bad / "no_config.pt", {k: v for k, v in d.items() if k != "config"})
    write_adapter(bad / "wrong_types.pt", {**d, "config": {**d["config"], "n_tokens": "1"}})
    write_adapter(bad / "tokens_list.pt", {**d, "tokens": d["tokens"].tolist()})
    write_adapter(bad / "huge_config.pt", {**d, "config": {**d["config"], "n_tokens": 10**12}})
    write_adapter(bad / "nan.pt", {**d, "tokens": torch.full_like(d["tokens"], float("nan"))})
    write_adapter(bad / "no_base.pt", {**d, "config": {k: v for k, v in d["config"].items() if k != "base"}})
    write_adapter(bad / "gone_base.pt", {**d, "config": {**d["config"], "base": str(box / "no_such_model")}})
    official_like = {"transformer.h.2.attn.gating_factor": torch.ones(1, 4, 1, 1),
                     "transformer.h.3.attn.gating_factor": torch.ones(1, 4, 1, 1),
                     "global_value_embedding.weight": torch.randn(1, 64)}
    write_adapter(bad / "official_like.pth", official_like)
    merge(box / "adapter.pt", bad / "merged")
    make_bad_models(box, bad)
    make_bad_sources(bad)
    make_hostile_paths(box, bad)
    make_checkpoints(good, bad)
    make_edges(box, bad, d)


def make_edges(box: Path, bad: Path, d: dict):
    """The edges' cases: the data under a second name (a hard link), a folder where the metrics file
    goes, an adapter whose start layer is impossible, a lesson folder holding a student's notes."""
    os.link(box / "data.json", bad / "hardlink_data.json")
    (bad / "md.metrics.jsonl").mkdir()
    write_adapter(bad / "negative_start.pt", {**d, "config": {**d["config"], "start_layer": -1}})
    with new_directory(bad / "lesson", "lessons.py start 2") as tmp:
        (tmp / "model.py").write_text("a copy the student works in")
    (bad / "lesson" / "notes.txt").write_text("the student's own notes")


def make_hostile_paths(box: Path, bad: Path):
    """What a path can be besides a new file: FIFOs, links to inputs and notes, files whose names a
    glob would match, a copy of a downloaded checkpoint (config.json and notes)."""
    os.mkfifo(bad / "fifo")
    os.mkfifo(bad / "fifo_m.metrics.jsonl")
    (bad / "link_to_data").symlink_to(box / "data.json")
    (bad / "linked.metrics.jsonl").symlink_to(box / "marker.txt")
    (box / "work" / ".notes.tmp").write_text("the user's hidden notes")
    (box / "work" / ".*.3f2a.tmp").write_text("a name a careless glob would match")
    shutil.copytree(bad / "hf", bad / "downloaded")
    (bad / "downloaded" / "notes.txt").write_text("the user's notes beside a downloaded checkpoint")
    cfg = json.loads((bad / "hf" / "config.json").read_text())
    for name, change in (("hf_negative_theta", {"rope_theta": -10000.0}), ("hf_eps_zero", {"rms_norm_eps": 0}),
                         ("hf_kv_heads_3", {"num_key_value_heads": 3}), ("hf_gelu", {"hidden_act": "gelu"}),
                         ("hf_bos_outside", {"bos_token_id": 10**6})):
        shutil.copytree(bad / "hf", bad / name)
        (bad / name / "config.json").write_text(json.dumps({**cfg, **change}))
    make_tokenizer_json(bad / "hf_bos_outside")
    src = bad / "odd_width_hf"
    make_hf_model(dim=40).save_pretrained(src)  # feed-forward 40 x 60: not a multiple of NF4's 64
    make_tokenizer_json(src)
    convert(str(src), bad / "odd_width")


def make_checkpoints(good, bad: Path):
    """A training checkpoint of the good adapter (one real AdamW step), and damaged copies of it."""
    optimizer = torch.optim.AdamW(good.parameters())
    (good.tokens.sum() + good.gates.sum()).backward()
    optimizer.step()
    d = {"aligner": to_dict(good), "optimizer": optimizer.state_dict(), "step": 1, "config": {"init": None}}
    torch.save(d, bad / "ckpt.pt")
    torch.save({**d, "step": -5}, bad / "ckpt_negative_step.pt")
    torch.save({**d, "step": 10**12}, bad / "ckpt_huge_step.pt")
    state = {k: {**v, "exp_avg": torch.zeros(7)} for k, v in d["optimizer"]["state"].items()}
    torch.save({**d, "optimizer": {**d["optimizer"], "state": state}}, bad / "ckpt_bad_optimizer.pt")


def broken_model(bad: Path, box: Path, name: str, file: str, text):
    shutil.copytree(box / "model", bad / name)
    (bad / name / file).write_bytes(text if isinstance(text, bytes) else text.encode())


def make_bad_models(box: Path, bad: Path):
    params = json.loads((box / "model" / "params.json").read_text())
    broken_model(bad, box, "params_list", "params.json", "[1, 2]")
    broken_model(bad, box, "params_null", "params.json", "null")
    broken_model(bad, box, "params_string", "params.json", json.dumps({**params, "dim": "64"}))
    broken_model(bad, box, "params_zero", "params.json", json.dumps({**params, "n_layers": 0}))
    broken_model(bad, box, "params_negative", "params.json", json.dumps({**params, "dim": -64}))
    broken_model(bad, box, "params_invalid", "params.json", "{dim: 64")
    broken_model(bad, box, "tok_config_invalid", "tokenizer_config.json", "{oops")
    broken_model(bad, box, "tok_config_types", "tokenizer_config.json", '{"bos_id": "1", "eos_id": 2, "add_bos": true}')
    broken_model(bad, box, "tok_ids_outside", "tokenizer_config.json",
                 '{"bos_id": 99999, "eos_id": 2, "add_bos": true}')
    broken_model(bad, box, "tokenizer_garbage", "tokenizer.json", "not a tokenizer")
    broken_model(bad, box, "sentencepiece_garbage", "tokenizer.model", b"\x00\x01 not a sentencepiece model")
    (bad / "sentencepiece_garbage" / "tokenizer.json").unlink()
    weights = (box / "model" / "model.safetensors").read_bytes()
    broken_model(bad, box, "weights_cut", "model.safetensors", weights[: len(weights) // 2])


def make_bad_sources(bad: Path):
    """Checkpoints for convert_weights.py that are broken in one way each."""
    hf = bad / "hf"
    make_hf_model().save_pretrained(hf)
    cfg = json.loads((hf / "config.json").read_text())
    for name, text in (("hf_invalid", "{not json"), ("hf_no_hidden_size", json.dumps({k: v for k, v in cfg.items()
                                                                                      if k != "hidden_size"})),
                       ("hf_list", "[]")):
        shutil.copytree(hf, bad / name)
        (bad / name / "config.json").write_text(text)
    shutil.copytree(hf, bad / "hf_bad_shape")
    from safetensors.torch import load_file, save_file

    state = load_file(bad / "hf_bad_shape" / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(62, 64)
    save_file(state, bad / "hf_bad_shape" / "model.safetensors")
    for name, params in (("meta_list", [1]), ("meta_no_dim", {"n_layers": 4, "n_heads": 4})):
        (bad / name).mkdir()
        (bad / name / "params.json").write_text(json.dumps(params))
        torch.save({}, bad / name / "consolidated.00.pth")
    import gguf

    writer = gguf.GGUFWriter(str(bad / "bare.gguf"), "llama")  # the architecture, and no other metadata
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# (name, script, arguments, words the error line must hold, argparse usage error?, extra environment)
# Paths: M model, D data, B the sandbox, X bad/ (inputs broken on purpose), A the existing adapter.
TRAIN = ["--model", "M", "--data", "D", "--out", "B/adapter.pt", "--quiet", "--device", "cpu", "--max-steps", "1",
         "--batch-size", "2", "--micro-batch-size", "2", "--eval-every", "0"]
GEN = ["--model", "M", "--prompt", "x", "--max-new-tokens", "2", "--device", "cpu"]
CASES = [
    ("batch size 0", "train.py", TRAIN + ["--batch-size", "0"], "--batch-size", True),
    ("micro-batch size 0", "train.py", TRAIN + ["--micro-batch-size", "0"], "--micro-batch-size", True),
    ("batch not a multiple", "train.py", TRAIN + ["--batch-size", "3"], "multiple", False),
    ("lr nan", "train.py", TRAIN + ["--lr", "nan"], "--lr", True),
    ("lr negative", "train.py", TRAIN + ["--lr", "-0.1"], "--lr", True),
    ("weight decay negative", "train.py", TRAIN + ["--weight-decay", "-1"], "--weight-decay", True),
    ("val fraction 1", "train.py", TRAIN + ["--val-fraction", "1.0"], "--val-fraction", True),
    ("val fraction negative", "train.py", TRAIN + ["--val-fraction", "-0.1"], "--val-fraction", True),
    ("warmup epochs nan", "train.py", TRAIN + ["--warmup-epochs", "nan"], "--warmup-epochs", True),
    ("huge seed", "train.py", TRAIN + ["--seed", str(10**30)], "--seed", True),
    ("device unknown", "train.py", TRAIN + ["--device", "xyz"], "--device", True),
    ("max steps 0", "train.py", TRAIN + ["--max-steps", "0"], "--max-steps", True),
    ("max steps negative", "train.py", TRAIN + ["--max-steps", "-1"], "--max-steps", True),
    ("epochs negative", "train.py", TRAIN[:-6] + ["--epochs", "-1"], "--epochs", True),
    ("epochs nan", "train.py", TRAIN[:-6] + ["--epochs", "nan"], "--epochs", True),
    ("epochs inf", "train.py", TRAIN[:-6] + ["--epochs", "inf"], "--epochs", True),
    ("eval every negative", "train.py", TRAIN + ["--eval-every", "-1"], "--eval-every", True),
    ("save every negative", "train.py", TRAIN + ["--save-every", "-1"], "--save-every", True),
    ("eval batches 0", "train.py", TRAIN + ["--eval-batches", "0"], "--eval-batches", True),
    ("tokens 0", "train.py", TRAIN + ["--tokens", "0"], "--tokens", True),
    ("start layer too high", "train.py", TRAIN + ["--start-layer", "9"], "--start-layer", False),
    ("data empty string", "train.py", ["--data", "", "--model", "M", *TRAIN[4:]], "--data", True),
    ("data is a directory", "train.py", ["--data", "B", "--model", "M", *TRAIN[4:]], "is a directory", False),
    ("data deeply nested", "train.py", ["--data", "X/nested.json", "--model", "M", *TRAIN[4:]], "nested too deeply",
     False),
    ("data lone surrogate", "train.py", ["--data", "X/surrogate.json", "--model", "M", *TRAIN[4:]], "surrogate",
     False),
    ("WORLD_SIZE without torchrun", "train.py", TRAIN, "torchrun", False, {"WORLD_SIZE": "2"}),
    ("out is a directory", "train.py", TRAIN[:4] + ["--out", "B/work"] + TRAIN[6:], "is a directory", False),
    ("out is the current folder", "train.py", TRAIN[:4] + ["--out", "."] + TRAIN[6:], "names a directory", False),
    ("out is the root", "train.py", TRAIN[:4] + ["--out", "/"] + TRAIN[6:], "names a directory", False),
    ("resume a file not there", "train.py", TRAIN[:4] + ["--out", "X/none.pt", "--resume"] + TRAIN[6:],
     "--resume continues", False),
    ("out under a file", "train.py", TRAIN[:4] + ["--out", "X/not_a_dir/a.pt"] + TRAIN[6:], "is a file", False),
    ("out not writable", "train.py", TRAIN[:4] + ["--out", "/sys/a.pt"] + TRAIN[6:], "not writable", False),
    ("out is the data", "train.py", TRAIN[:4] + ["--out", "D"] + TRAIN[6:], "would overwrite", False),
    ("out is the model's weights", "train.py", TRAIN[:4] + ["--out", "M/model.safetensors"] + TRAIN[6:],
     "would overwrite", False),
    ("metrics file is the data", "train.py", ["--model", "M", "--data", "X/d.metrics.jsonl", "--out", "X/d.pt",
                                              *TRAIN[6:]], "would overwrite", False),
    ("resume a plain adapter", "train.py", TRAIN + ["--resume"], "cannot be resumed", False),
    ("resume an official checkpoint", "train.py", TRAIN[:4] + ["--out", "X/official_like.pth", "--resume"]
     + TRAIN[6:], "cannot be resumed", False),
    ("init for another base", "train.py", TRAIN + ["--init", "OFFICIAL"], "dim 4096", False),
    ("init NaN adapter", "train.py", TRAIN + ["--init", "X/nan.pt"], "NaN", False),
    ("max new tokens negative", "generate.py", GEN + ["--max-new-tokens", "-5"], "--max-new-tokens", True),
    ("top-k negative", "generate.py", GEN + ["--top-k", "-3"], "--top-k", True),
    ("temperature nan", "generate.py", GEN + ["--temperature", "nan"], "--temperature", True),
    ("top-p 0", "generate.py", GEN + ["--top-p", "0"], "--top-p", True),
    ("generate device unknown", "generate.py", GEN + ["--device", "xyz"], "--device", True),
    ("adapter empty string", "generate.py", GEN + ["--adapter", ""], "--adapter", True),
    ("adapter missing config", "generate.py", GEN + ["--adapter", "X/no_config.pt"], "config", False),
    ("adapter wrong types", "generate.py", GEN + ["--adapter", "X/wrong_types.pt"], "config", False),
    ("adapter tokens as a list", "generate.py", GEN + ["--adapter", "X/tokens_list.pt"], "tokens", False),
    ("adapter claims 10^12 tokens", "generate.py", GEN + ["--adapter", "X/huge_config.pt"], "do not match", False),
    ("adapter NaN", "generate.py", GEN + ["--adapter", "X/nan.pt"], "NaN", False),
    ("adapter is a directory", "generate.py", GEN + ["--adapter", "B"], "is a directory", False),
    ("adapter on its merged model", "generate.py", GEN[:1] + ["X/merged"] + GEN[2:] + ["--adapter", "A"],
     "already has an Aligner merged", False),
    ("adapter's base gone", "generate.py", GEN[2:] + ["--adapter", "X/gone_base.pt"], "was trained on", False),
    ("model directory missing", "generate.py", ["--model", "B/nothing"] + GEN[2:], "params.json not found", False),
    ("model missing, --no-adapter", "generate.py", ["--model", "B/nothing"] + GEN[2:] + ["--no-adapter"],
     "params.json not found", False),
    ("prompt not UTF-8 on stdin", "generate.py", GEN[:2] + GEN[4:], "not UTF-8", False, {}, b"caf\xe9\n"),
    ("params.json a list", "generate.py", ["--model", "X/params_list"] + GEN[2:], "JSON object", False),
    ("params.json null", "generate.py", ["--model", "X/params_null"] + GEN[2:], "JSON object", False),
    ("params.json dim a string", "generate.py", ["--model", "X/params_string"] + GEN[2:], "dim is '64'", False),
    ("params.json zero layers", "generate.py", ["--model", "X/params_zero"] + GEN[2:], "n_layers is 0", False),
    ("params.json negative dim", "generate.py", ["--model", "X/params_negative"] + GEN[2:], "dim is -64", False),
    ("params.json invalid", "generate.py", ["--model", "X/params_invalid"] + GEN[2:], "not valid JSON", False),
    ("tokenizer config invalid", "generate.py", ["--model", "X/tok_config_invalid"] + GEN[2:], "not valid JSON",
     False),
    ("tokenizer config types", "generate.py", ["--model", "X/tok_config_types"] + GEN[2:], "bos_id", False),
    ("tokenizer.json broken", "generate.py", ["--model", "X/tokenizer_garbage"] + GEN[2:], "tokenizer cannot",
     False),
    ("tokenizer.model broken", "generate.py", ["--model", "X/sentencepiece_garbage"] + GEN[2:],
     "tokenizer cannot", False),
    ("weights truncated", "generate.py", ["--model", "X/weights_cut"] + GEN[2:], "cannot read", False),
    ("merge into .", "adapter.py", ["merge", "--adapter", "A", "--out", ".", "--force"], "current directory", False),
    ("merge into ..", "adapter.py", ["merge", "--adapter", "A", "--out", "..", "--force"], "current directory",
     False),
    ("merge over the base", "adapter.py", ["merge", "--adapter", "A", "--out", "M", "--force"], "input", False),
    ("merge over a foreign directory", "adapter.py", ["merge", "--adapter", "A", "--out", "X/existing_dir",
                                                      "--force"], "not written by this project", False),
    ("merge over a file", "adapter.py", ["merge", "--adapter", "A", "--out", "D"], "is a file", False),
    ("merge a NaN adapter", "adapter.py", ["merge", "--adapter", "X/nan.pt", "--out", "B/m"], "NaN", False),
    ("merge, no base recorded", "adapter.py", ["merge", "--adapter", "X/no_base.pt", "--out", "B/m"],
     "records no base", False),
    ("inspect a directory", "adapter.py", ["inspect", "B"], "is a directory", False),
    ("compare with a NaN adapter", "adapter.py", ["compare", "A", "X/nan.pt"], "NaN", False),
    ("plot over the adapter", "adapter.py", ["inspect", "A", "--plot", "A"], "would overwrite", False),
    ("convert into .", "convert_weights.py", ["X/hf", ".", "--force"], "current directory", False),
    ("convert into ..", "convert_weights.py", ["X/hf", "..", "--force"], "current directory", False),
    ("convert onto its source", "convert_weights.py", ["X/hf", "X/hf", "--force"], "input", False),
    ("convert over a foreign directory", "convert_weights.py", ["X/hf", "X/existing_dir", "--force"],
     "not written by this project", False),
    ("convert over a file", "convert_weights.py", ["X/hf", "D"], "is a file", False),
    ("HF config invalid", "convert_weights.py", ["X/hf_invalid", "B/c"], "not valid JSON", False),
    ("HF config without hidden_size", "convert_weights.py", ["X/hf_no_hidden_size", "B/c"], "hidden_size", False),
    ("HF config a list", "convert_weights.py", ["X/hf_list", "B/c"], "JSON object", False),
    ("HF tensor of the wrong shape", "convert_weights.py", ["X/hf_bad_shape", "B/c"], "(62, 64)", False),
    ("Meta params a list", "convert_weights.py", ["X/meta_list", "B/c"], "JSON object", False),
    ("Meta params without dim", "convert_weights.py", ["X/meta_no_dim", "B/c"], "dim", False),
    ("GGUF without metadata", "convert_weights.py", ["X/bare.gguf", "B/c"], "embedding_length", False),
    # outputs: what a path really is, implicit inputs included
    ("answers over the adapter's base weights", "generate.py", GEN[2:] + ["--adapter", "A", "--data", "D", "--out",
                                                                          "M/model.safetensors"], "would overwrite",
     False),
    ("answers over the base's tokenizer", "generate.py", GEN[2:] + ["--adapter", "A", "--data", "D", "--out",
                                                                    "M/tokenizer.json"], "would overwrite", False),
    ("out is /dev/null", "train.py", TRAIN[:4] + ["--out", "/dev/null"] + TRAIN[6:], "character device", False),
    ("answers to /dev/null", "generate.py", GEN + ["--data", "D", "--out", "/dev/null"], "not a regular file",
     False),
    ("out ends in a slash", "train.py", TRAIN[:4] + ["--out", "B/newdir/"] + TRAIN[6:], "names a directory", False),
    ("out is a FIFO", "train.py", TRAIN[:4] + ["--out", "X/fifo"] + TRAIN[6:], "FIFO", False),
    ("metrics file is a FIFO", "train.py", TRAIN[:4] + ["--out", "X/fifo_m.pt"] + TRAIN[6:], "FIFO", False),
    ("out links to the data", "train.py", TRAIN[:4] + ["--out", "X/link_to_data"] + TRAIN[6:], "symbolic link",
     False),
    ("metrics file links to notes", "train.py", TRAIN[:4] + ["--out", "X/linked.pt"] + TRAIN[6:], "symbolic link",
     False),
    ("out is a glob, data missing", "train.py", ["--model", "M", "--data", "B/missing.json", "--out", "*",
                                                 *TRAIN[6:]], "not found", False),
    ("plot to /dev/null", "adapter.py", ["inspect", "A", "--plot", "/dev/null"], "not a regular file", False),
    ("plot over the base weights", "adapter.py", ["inspect", "A", "--plot", "M/model.safetensors"],
     "would overwrite", False),
    ("merge --force over a downloaded checkpoint", "adapter.py", ["merge", "--adapter", "A", "--out",
                                                                  "X/downloaded", "--force"],
     "not written by this project", False),
    ("convert --force over a downloaded checkpoint", "convert_weights.py", ["X/hf", "X/downloaded", "--force"],
     "not written by this project", False),
    ("experiment out is a file", "experiments/form_vs_knowledge.py", ["--quick", "--out", "D"], "must be a folder",
     False),
    # converted configs
    ("HF rope_theta negative", "convert_weights.py", ["X/hf_negative_theta", "B/c"], "rope_theta is -10000", False),
    ("HF rms_norm_eps 0", "convert_weights.py", ["X/hf_eps_zero", "B/c"], "norm_eps is 0", False),
    ("HF heads do not divide", "convert_weights.py", ["X/hf_kv_heads_3", "B/c"], "do not divide", False),
    ("HF activation not SiLU", "convert_weights.py", ["X/hf_gelu", "B/c"], "hidden_act", False),
    ("HF bos id outside the vocabulary", "convert_weights.py", ["X/hf_bos_outside", "B/c"], "outside the vocab",
     False),
    # resume means the same run; checkpoint fields checked
    ("resume with other --tokens", "train.py", TRAIN[:4] + ["--out", "X/ckpt.pt", "--resume", "--tokens", "3"]
     + TRAIN[6:], "--tokens is 3 here", False),
    ("resume on another base", "train.py", ["--model", "X/odd_width", *TRAIN[2:4], "--out", "X/ckpt.pt", "--resume",
                                            *TRAIN[6:]], "--model", False),
    ("resume a negative step", "train.py", TRAIN[:4] + ["--out", "X/ckpt_negative_step.pt", "--resume"]
     + TRAIN[6:], "step -5", False),
    ("resume a damaged optimizer", "train.py", TRAIN[:4] + ["--out", "X/ckpt_bad_optimizer.pt", "--resume"]
     + TRAIN[6:], "optimizer state", False),
    # edges
    ("tokenizer ids outside the vocabulary", "generate.py", ["--model", "X/tok_ids_outside"] + GEN[2:],
     "outside the model's vocabulary", False),
    ("nf4 on a width not a multiple of 64", "generate.py", ["--model", "X/odd_width"] + GEN[2:] + ["--quantize",
                                                                                                 "nf4"],
     "multiple of 64", False),
    ("bench tokens 0", "bench.py", ["--tokens", "0"], "--tokens", True),
    ("bench device unknown", "bench.py", ["--device", "xyz"], "--device", True),
    ("bench sequence past the context", "bench.py", ["--seq", "100000", "--no-peer"], "must fit", False),
    ("bench prompt leaves no label", "bench.py", ["--prompt", "0.99", "--seq", "8", "--no-peer"], "no labelled",
     False),
    ("demo steps negative", "demo.py", ["--steps", "-1"], "--steps", True),
    ("demo limit 0", "demo.py", ["--limit", "0"], "--limit", True),
    ("demo tokens nan", "demo.py", ["--tokens", "nan"], "--tokens", True),
    # the edges' rules in every command (issue 36, item 7)
    ("experiment out is /", "experiments/form_vs_knowledge.py", ["--quick", "--out", "/"], "one above it", False),
    ("experiment out is a foreign folder", "experiments/form_vs_knowledge.py", ["--quick", "--out",
                                                                               "X/existing_dir"],
     "not written by this project", False),
    ("lesson --force over a student's notes", "lessons.py", ["start", "2", "--dir", "X/lesson", "--force"],
     "notes.txt, which this project did not write", False),
    ("serve bench out is /dev/null", "benchmarks/serve_bench.py", ["--model", "M", "--out", "/dev/null"],
     "character device", False),
    ("epochs 1e300", "train.py", TRAIN[:-6] + ["--epochs", "1e300"], "--epochs", True),
    ("max steps 10^9", "train.py", TRAIN + ["--max-steps", str(10**9)], "--max-steps", True),
    ("resume a step of 10^12", "train.py", TRAIN[:4] + ["--out", "X/ckpt_huge_step.pt", "--resume"] + TRAIN[6:],
     "100,000,000", False),
    ("tokens beside --init", "train.py", TRAIN[:4] + ["--out", "B/i.pt"] + TRAIN[6:] + ["--tokens", "3", "--init",
                                                                                       "A"], "--tokens is 3", False),
    ("start layer beside --init", "train.py", TRAIN[:4] + ["--out", "B/i.pt"] + TRAIN[6:] + ["--start-layer", "1",
                                                                                            "--init", "A"],
     "--start-layer is 1", False),
    ("micro-batch too large for memory", "train.py", TRAIN + ["--batch-size", str(10**8), "--micro-batch-size",
                                                              str(10**8)], "GiB are free", False),
    ("batch too large for memory", "train.py", TRAIN + ["--batch-size", str(10**12)], "GiB are free", False),
    ("tokens too large for memory", "train.py", TRAIN + ["--tokens", str(10**9)], "GiB are free", False),
    ("out name too long for its temporary", "train.py", TRAIN[:4] + ["--out", "B/" + "x" * 225 + ".pt"] + TRAIN[6:],
     "too long for this file system", False),
    ("out is the data through a hard link", "train.py", TRAIN[:4] + ["--out", "X/hardlink_data.json"] + TRAIN[6:],
     "would overwrite", False),
    ("metrics file is a folder", "train.py", TRAIN[:4] + ["--out", "X/md.pt"] + TRAIN[6:], "is a directory", False),
    ("out with a newline, under a file", "train.py", TRAIN[:4] + ["--out", "X/not_a_dir/a\nb.pt"] + TRAIN[6:],
     "a\\nb.pt", False),
    ("--adapter with --no-adapter", "generate.py", GEN + ["--adapter", "A", "--no-adapter"], "--no-adapter", False),
    ("adapter with a start layer of -1", "generate.py", GEN + ["--adapter", "X/negative_start.pt"],
     "the file is damaged", False),
]


def expand(arg: str, box: Path) -> str:
    names = {"M": box / "model", "D": box / "data.json", "B": box, "X": box / "bad", "A": box / "adapter.pt",
             "OFFICIAL": OFFICIAL_7B}
    head, _, tail = arg.partition("/")
    slash = "/" if arg.endswith("/") else ""  # kept: a trailing slash says "a directory"
    return str(names[head] / tail if tail else names[head]) + slash if head in names else arg


def run_case(case, box: Path):
    script, args = case[1:3]
    env, stdin = (case[5] if len(case) > 5 else {}), (case[6] if len(case) > 6 else b"")
    cmd = [str(ROOT / script), *(expand(a, box) for a in args)]
    return shared().run(cmd, box / "work", {**os.environ, "OMP_NUM_THREADS": "1", **env}, stdin)


def snapshot(box: Path) -> dict:
    return {str(p.relative_to(box)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(box.rglob("*"))}


@pytest.fixture(scope="module")
def sandbox(tiny):
    """The sandbox and every case's result, all cases run once, two at a time (forked from the two
    servers that imported torch once: tests/forkrun.py)."""
    box = Path(tempfile.mkdtemp(prefix="aligner-sandbox-"))
    make_sandbox(box, tiny[1])
    before = snapshot(box)
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip((c[0] for c in CASES), pool.map(lambda c: run_case(c, box), CASES)))
    yield box, before, results
    shutil.rmtree(box)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(sandbox, case):
    name, _, args, words, usage = case[:5]
    if "OFFICIAL" in args and OFFICIAL_7B is None:
        pytest.skip("the official Aligner samples lie beside the checkout")
    if name == "device unknown" and HAS_CUDA:
        pytest.skip("a GPU machine has the device")
    r = sandbox[2][name]
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    if usage:  # argparse's own format: usage lines, then "prog: error: argument --flag: ..."
        assert lines[-1].startswith(f"{case[1]}: error: argument") and words in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


def test_cuda_flag_without_a_gpu(sandbox):
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    r = run_case(("cuda", "train.py", TRAIN + ["--device", "cuda"], "", True), sandbox[0])
    assert r.returncode == 2 and b"no cuda device" in r.stderr and b"Traceback" not in r.stderr


def test_no_case_changed_a_file(sandbox):
    box, before, _ = sandbox
    after = snapshot(box)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed


# ---- runs that start well and then go wrong -----------------------------------------------------------
def test_divergence_keeps_the_last_good_checkpoint(tiny, tmp_path):
    """--lr inf makes the Aligner infinite; --lr 1e30 keeps it finite but its loss NaN. Either way
    the file at --out stays the last good checkpoint, and it still resumes, generates and inspects."""
    _, path = tiny
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    out = tmp_path / "a.pt"
    base = ["--model", str(path), "--data", str(tmp_path / "d.json"), "--out", str(out), "--batch-size", "2",
            "--micro-batch-size", "2", "--eval-every", "0", "--quiet", "--device", "cpu", "--save-every", "1"]
    train.main(base + ["--max-steps", "2"])
    good, metrics = out.read_bytes(), (tmp_path / "a.metrics.jsonl").read_text()
    for lr, words in (("inf", "--lr"), ("1e30", "last good checkpoint")):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *base, "--max-steps", "5", "--resume",
                            "--lr", lr, "--warmup-steps", "0"], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, r.stderr
        assert out.read_bytes() == good
    assert (tmp_path / "a.metrics.jsonl").read_text().startswith(metrics)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *base, "--max-steps", "3", "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert torch.isfinite(load_aligner(out).tokens).all()


def test_stale_temporary_files_are_removed(tiny, tmp_path):
    _, path = tiny
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.pt.{dead.stdout.strip()}.{'0f' * 8}.aligner-tmp"  # a run killed while saving
    stale.write_bytes(b"left by a run killed while saving")
    users = tmp_path / ".a.pt.x1y2.tmp"  # the user's own file, whatever it looks like
    users.write_bytes(b"mine")
    train.main(["--model", str(path), "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "a.pt"),
                "--max-steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--eval-every", "0",
                "--quiet", "--device", "cpu"])
    assert not stale.exists() and (tmp_path / "a.pt").is_file() and users.read_bytes() == b"mine"


def test_ctrl_c_while_the_model_loads_is_exit_130(tiny, tmp_path, monkeypatch, capsys):
    """In process: Ctrl-C cannot be timed to land inside loading from outside, so loading raises it."""
    _, path = tiny
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "load_model", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(path), "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "a.pt")])
    assert e.value.code == 130 and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()


def test_plot_into_a_new_folder(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    a = nonzero_aligner(load_model(tiny[1]).args, 2)
    save_aligner(a, tmp_path / "a.pt")
    r = subprocess.run([sys.executable, str(ROOT / "adapter.py"), "inspect", str(tmp_path / "a.pt"), "--plot",
                        str(tmp_path / "new" / "g.png")], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "new" / "g.png").stat().st_size > 1000, r.stderr


# ---- property-based: any input loads or is refused with the project's error --------------------------
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["instruction", "input", "output", "chosen", "rejected"]) | st.text(max_size=4),
                        inner, max_size=5), max_leaves=12)
RECORD = st.fixed_dictionaries({}, optional={k: st.text(max_size=30) | st.integers() | st.none()
                                             for k in ("instruction", "input", "output", "chosen", "rejected")})


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(value=JSON | st.lists(RECORD, max_size=4), jsonl=st.booleans())
def test_any_json_loads_or_is_refused(tiny, value, jsonl):
    tok = Tokenizer(tiny[1])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("data.jsonl" if jsonl else "data.json")
        values = value if jsonl and isinstance(value, list) else [value]
        path.write_text("\n".join(json.dumps(v) for v in values) if jsonl else json.dumps(value))
        for reader in (load_examples, load_pairs):
            try:
                data = reader(path, tok, 64)
                assert data.examples
            except UserError:
                pass


def tensors():
    shapes = st.lists(st.integers(0, 5), max_size=4)
    dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool])
    fill = st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -2.5])
    return st.builds(lambda s, t, v: torch.full(s, v).to(t), shapes, dtypes, fill)


KEYS = ["format", "config", "tokens", "gates", "aligner", "global_value_embedding.weight",
        "transformer.h.2.attn.gating_factor", "transformer.h.3.attn.gating_factor",
        "transformer.h.2.attn.adapter_wte.weight", "transformer.h.3.attn.adapter_wte.weight"]
CONFIG = st.dictionaries(st.sampled_from(["n_tokens", "start_layer", "per_layer", "dim", "n_layers", "n_heads",
                                          "base", "template"]) | st.integers(),
                         st.integers(-2, 10**12) | st.booleans() | st.text(max_size=3) | st.none(), max_size=8)
VALUES = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=12), st.just("aligner-v1"),
                   tensors(), CONFIG, st.lists(st.integers(), max_size=3))


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(d=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), VALUES, max_size=8),
                  nest=st.booleans())
def test_any_adapter_dict_loads_or_is_refused(d, nest):
    try:
        a = from_state({"aligner": d} if nest else d, "x.pt")
        assert torch.isfinite(a.tokens).all() and torch.isfinite(a.gates).all()
    except UserError:
        pass


def test_a_real_adapter_round_trips_through_the_loader(tiny, tmp_path):
    a = nonzero_aligner(load_model(tiny[1]).args, 3)
    b = from_state(to_dict(a))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.gates, b.gates)  # exact: a copy of the numbers


def test_atomic_writes_keep_the_usual_file_mode(tmp_path):
    """A new file gets the mode open() would give it (not mkstemp's owner-only 0600); a rewrite keeps the
    old file's mode."""
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.txt", lambda f: f.write(b"x"))
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "new.txt").chmod(0o640)
        atomic_write(tmp_path / "new.txt", lambda f: f.write(b"y"))
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
