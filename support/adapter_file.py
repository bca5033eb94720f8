"""Adapter files: an Aligner saved by train.py, read back by generate.py, and the official released
checkpoints read into the same Aligner. Files come from strangers: read with weights_only=True,
every field checked.

    save_aligner(aligner, "out.pt")
    aligner = load_aligner("out.pt")        # ours, a training checkpoint, or an official .pth
    path = base_dir(aligner, "out.pt")      # the base model directory it was trained on
    path = one_base([("a.pt", a), ("b.pt", b)])  # the one base of several (or a UserError)
    files = RunFiles("out.pt", inputs=["data.json"], base=None, resume=False)  # train.py's, checked
    with files: files.log(row); files.save(aligner, optimizer, step, cfg)  # + out.metrics.jsonl
    checkpoint = files.checkpoint({"--tokens": 1})  # for --resume: .aligner, .step, .restore(optimizer)
    aligner = load_aligner("sft.pt", like=cfg)  # --init, its --tokens/--start-layer/--per-layer as cfg's
    aligner = fitting(aligner, model.args, "checkpoints/x", "a.pt")  # or a UserError: another base's adapter
    model, tok, columns = load_for_generation(cfg, runtime)  # generate.py: the base and a Column each

The format ("aligner-v1"): {"format", "tokens", "gates", "config": {n_tokens, start_layer,
per_layer, dim, n_layers, n_heads, and plain metadata: base, template, mode, ...}}.
Not run on its own. Read next: parallel.py.
"""
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from aligner import Aligner
from model import ModelArgs
from support.chat import Chat
from support.checkpoint import Base, load_base
from support.errors import UserError
from support.flags import MAX_STEPS
from support.inputs import load_weights
from support.official import read_official_aligner
from support.outputs import check_outputs
from support.temporary import StagedLines, atomic_save

FORMAT = "aligner-v1"
SHAPE_KEYS = ("n_tokens", "start_layer", "per_layer", "dim", "n_layers", "n_heads")


def to_dict(a: Aligner) -> dict:
    config = {"n_tokens": a.n_tokens, "start_layer": a.start_layer, "per_layer": a.per_layer,
              "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, **a.meta}
    return {"format": FORMAT, "tokens": a.tokens.detach().cpu(), "gates": a.gates.detach().cpu(),
            "config": config}


def save_aligner(a: Aligner, path):
    atomic_save(to_dict(a), path)


def load_aligner(path, like=None) -> Aligner:
    """Our adapter file, a training checkpoint, or an official released Aligner checkpoint. With
    `like` (train.py's --init: its config), the flags that define an Aligner must say what it is."""
    return from_state(load_weights(path), path) if like is None else load_init(path, like)


def fitting(a: Aligner, args: ModelArgs, base, adapter) -> Aligner:
    """`a`, read from the file `adapter`, once Aligner.check_fits says it fits the base directory `base`
    with these args (its ValueError is the user's: an adapter of another base, or a base with an
    Aligner merged in; one line that names both)."""
    try:
        a.check_fits(args, str(base))
    except ValueError as e:
        raise UserError(f"{adapter}: {e}") from None
    return a


def base_dir(a: Aligner, where="the adapter", model=None) -> Path:
    """The base model directory: `model` when given, else the one the adapter was trained on."""
    if model:
        return Path(model)
    if not isinstance(a.meta.get("base"), str):
        raise UserError(f"{where} records no base model: pass --model DIR")
    if not (Path(a.meta["base"]) / "params.json").is_file():
        raise UserError(f"{where} was trained on {a.meta['base']}, which is not there: pass --model DIR")
    return Path(a.meta["base"])


def one_base(adapters: list, model=None):
    """The base model directory of [(path, Aligner)]: `model` (--model), or the one every adapter
    names (None: the default)."""
    bases = {str(base_dir(a, path, model)) for path, a in adapters}
    if len(bases) > 1:
        raise UserError(f"the adapters were trained on different base models ({', '.join(sorted(bases))}): "
                        f"pass --model DIR to use one")
    return bases.pop() if bases else model


def from_state(d: dict, where="adapter") -> Aligner:
    """The Aligner in a loaded file's dict; anything else, or anything damaged, is a UserError."""
    if isinstance(d.get("aligner"), dict):
        d = d["aligner"]  # a training checkpoint (train.py --resume)
    if isinstance(d.get("format"), str) and d["format"] == FORMAT:
        return from_dict(d, where)
    if any(isinstance(k, str) and k.endswith("attn.gating_factor") for k in d):
        tokens, gates, start, per_layer = read_official_aligner(d, where)
        meta = {"source": f"official: {Path(where).name}"}
        return from_tensors(tokens, gates, start, per_layer, meta, where)
    raise UserError(f"{where}: this is a PyTorch file but not an Aligner adapter "
                    f"(none of its keys look like one)")


def from_dict(d: dict, where="adapter") -> Aligner:
    """Our own format: tokens, gates and a config that must agree with them."""
    c = d.get("config")
    kinds = {k: bool if k == "per_layer" else int for k in SHAPE_KEYS}
    if not isinstance(c, dict) or any(type(c.get(k)) is not kind for k, kind in kinds.items()):
        raise UserError(f"{where}: its config is missing or damaged (it needs whole numbers "
                        f"{', '.join(SHAPE_KEYS[:2] + SHAPE_KEYS[3:])} and per_layer true or false)")
    meta = {k: v for k, v in c.items() if k not in SHAPE_KEYS}
    if any(not isinstance(k, str) or not isinstance(v, (str, int, float, bool)) for k, v in meta.items()):
        raise UserError(f"{where}: its config holds something other than names and plain values")
    a = from_tensors(d.get("tokens"), d.get("gates"), c["start_layer"], c["per_layer"], meta, where)
    if [a.n_tokens, a.start_layer, a.per_layer, a.dim, a.n_layers, a.n_heads] != [c[k] for k in SHAPE_KEYS]:
        raise UserError(f"{where}: tensor shapes do not match its own config; the file is damaged")
    return a


def from_tensors(tokens, gates, start_layer: int, per_layer: bool, meta: dict, where="adapter") -> Aligner:
    """An Aligner holding these tensors, once they are finite float tensors of agreeing shapes:
    tokens (N, D), or (L - s, N, D) per layer, and gates (L - s, H)."""
    for name, t, rank in (("tokens", tokens, 3 if per_layer else 2), ("gates", gates, 2)):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == rank and t.numel()):
            raise UserError(f"{where}: {name} is not a non-empty float tensor of rank {rank}; the file "
                            f"is damaged")
        if not torch.isfinite(t).all():
            raise UserError(f"{where}: {name} holds NaN or infinite values (from a run that "
                            f"diverged?); it cannot be used")
    (n_gated, n_heads), (n_tokens, dim) = gates.shape, tokens.shape[-2:]
    if per_layer and tokens.shape[0] != n_gated:
        raise UserError(f"{where}: {tokens.shape[0]} per-layer prompts for {n_gated} gated layers")
    try:  # the checks of a flag, here on numbers the file holds: the file is damaged, no flag is bad
        args = ModelArgs(dim=dim, n_layers=start_layer + n_gated, n_heads=n_heads)
        aligner = Aligner(args, n_tokens, start_layer, per_layer, meta)
    except ValueError as e:
        raise UserError(f"{where}: the file is damaged: its {str(e).lstrip('-')}") from None
    aligner.load_state_dict({"tokens": tokens.float(), "gates": gates.float()})
    return aligner


def refuse_shared_metrics(out: Path, metrics: Path):
    """a.pt, a.ckpt and a all keep their metrics in a.metrics.jsonl: refuse an --out that is a metrics
    file's name, and metrics that are there while they may be another checkpoint's (theirs not at --out,
    or another file there of the same name but the suffix)."""
    if out.name.endswith(".metrics.jsonl"):
        raise UserError(f"--out {out} is the name of a run's metrics file: name the checkpoint (e.g. .pt)")
    if not metrics.exists():
        return
    others = [p.name for p in out.parent.iterdir() if p.with_suffix(".metrics.jsonl") == metrics
              and p not in (out, metrics) and p.is_file()]
    if others or not out.exists():
        whose = ", ".join(others) or "its checkpoint"
        raise UserError(f"{metrics} may be the metrics of another run ({whose} and not {out.name}): move or "
                        f"delete it, or choose another --out")


class RunFiles:
    """train.py's files at --out: the checkpoint (the Aligner that generate.py reads; the optimizer
    state, step and config that --resume reads) and OUT.metrics.jsonl beside it. Both are checked
    before any work (neither may be an input, a base model file or a folder); while the run lives
    the metrics are staged beside their target (support/temporary.StagedLines) and `save` publishes
    them right after the checkpoint they describe, so a run killed at any moment leaves both as the
    last save left them. `out` None, or a process that is not the first rank: nothing is written."""

    def __init__(self, out, inputs, base, resume: bool, writer: bool = True):
        self.out, self.metrics = out, None
        if out:
            check_outputs([out], inputs, base)  # first: "." or "/" has no name to derive the metrics' from
            self.metrics = Path(out).with_suffix(".metrics.jsonl")
            check_outputs([self.metrics], inputs, base)
            refuse_shared_metrics(Path(out), self.metrics)
        if resume and not (out and Path(out).is_file()):
            raise UserError(f"--resume continues the checkpoint at --out, and {out!r} is no file: give the "
                            f"--out of the run to continue, or leave out --resume")
        self.lines = StagedLines(self.metrics if out and writer else None, resume)

    def checkpoint(self, given: dict) -> "Checkpoint":
        """The checkpoint at --out for --resume (Checkpoint.read: `given` flags must match)."""
        return Checkpoint.read(self.out, given)

    def __enter__(self):
        self.lines.__enter__()
        return self

    def log(self, row: dict):
        """One line of metrics (a dict), staged until the next `save`."""
        self.lines.write(row)

    def save(self, aligner: Aligner, optimizer, step: int, cfg):
        """The checkpoint at `step`, atomically, then the metrics up to it."""
        if self.lines.path:
            Checkpoint.write(aligner, optimizer, step, cfg, self.out)
            self.lines.publish()

    def __exit__(self, *exc):
        self.lines.__exit__(*exc)


class Checkpoint(NamedTuple):
    """train.py's checkpoint file: the Aligner (what generate.py reads), the optimizer state and the
    step (what --resume reads), and the config. `Checkpoint.write` saves one atomically;
    `Checkpoint.read` reads one for --resume, and its `restore(optimizer)` puts the optimizer state
    into the new run's optimizer (restore_optimizer)."""
    aligner: Aligner
    step: int
    state: dict  # the checkpoint as read
    path: str

    @staticmethod
    def write(aligner: Aligner, optimizer, step: int, cfg, path):
        """The checkpoint of a run at `step`, atomically (cfg: a train.TrainConfig)."""
        atomic_save({"aligner": to_dict(aligner), "optimizer": optimizer.state_dict(), "step": step,
                     "config": asdict(cfg)}, path)

    @staticmethod
    def read(path, given: dict) -> "Checkpoint":
        """The checkpoint at `path`, its fields checked like an adapter's, and each flag of `given`
        ({"--tokens": 1, ...}: what defines the Aligner and its base) equal to what it was trained with."""
        d = load_weights(path)
        if not isinstance(d.get("aligner"), dict) or "optimizer" not in d or "step" not in d:
            raise UserError(f"{path} is an adapter but not a training checkpoint of train.py, so it "
                            f"cannot be resumed; start a new run from it with --init {path}")
        aligner = from_dict(d["aligner"], path)
        if type(d["step"]) is not int or not 0 <= d["step"] <= MAX_STEPS:
            raise UserError(f"{path}: its step {d['step']!r} is not a whole number from 0 to {MAX_STEPS:,}; "
                            f"the file is damaged")
        config = d["config"] if isinstance(d.get("config"), dict) else {}
        trained = {"--tokens": aligner.n_tokens, "--start-layer": aligner.start_layer,
                   "--per-layer": aligner.per_layer, "--model": aligner.meta.get("base"),
                   "--template": aligner.meta.get("template", "alpaca"),
                   "--dpo": aligner.meta.get("mode") == "dpo",
                   "--quantize": aligner.meta.get("quantize", "none"), "--init": config.get("init")}
        for flag, value in given.items():
            if value != trained[flag]:
                raise UserError(f"--resume: {flag} is {value!r} here, but {path} was trained with "
                                f"{trained[flag]!r}: give the same value, or leave out --resume to "
                                f"start anew")
        return Checkpoint(aligner, d["step"], d, path)

    def restore(self, optimizer):
        restore_optimizer(optimizer, self.state["optimizer"], self.path)


def load_init(path, cfg) -> Aligner:
    """The adapter that --init names, when the flags that define an Aligner (--tokens, --start-layer,
    --per-layer) say what it is: a run started from it is that Aligner, as a resumed run is."""
    aligner = load_aligner(path)
    have = {"--tokens": aligner.n_tokens, "--start-layer": aligner.start_layer,
            "--per-layer": aligner.per_layer}
    for flag, value in have.items():
        given = getattr(cfg, flag[2:].replace("-", "_"))
        if given != value:
            raise UserError(f"--init: {flag} is {given!r} here, but {path} has {value!r}: give the same "
                            f"value (or leave out --init to train a new Aligner)")
    return aligner


def restore_optimizer(optimizer, state, where):
    """The optimizer's moments from a checkpoint, each checked against its parameter; the
    hyperparameters stay the ones this run was given."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise UserError(f"{where}: its optimizer state does not fit this Aligner ({type(e).__name__}); "
                        f"the file is damaged") from None
    for group, fresh in zip(optimizer.param_groups, hyper):
        group.update(fresh)
        for p in group["params"]:
            for name, t in optimizer.state.get(p, {}).items():
                ok = isinstance(t, torch.Tensor) and (t.dim() == 0 or t.shape == p.shape)
                if not ok or not torch.isfinite(t).all() or name == "step" and t.item() < 0:
                    raise UserError(f"{where}: its optimizer state {name!r} is damaged")


class Column(NamedTuple):  # one way of answering every prompt: the base model, or an adapter file
    name: str
    aligner: Aligner
    template: str
    chat: Chat  # the chat template when `template` is "chat", else None
    eos_id: int  # the token that ends an answer: the chat template's end of turn, or EOS


def load_for_generation(cfg, runtime):
    """(model, tokenizer, Columns) for generate.py's config `cfg` (its --adapter, --model, --template,
    --compare, --data, --out; chat.py's as one): the base model's column first when asked. --out is checked
    against every input, the base the adapters name included, before the model is loaded."""
    adapters = [(path, load_aligner(path)) for path in cfg.adapter or [] if not cfg.no_adapter]
    base = one_base(adapters, cfg.model)
    if cfg.out:
        check_outputs([cfg.out], [cfg.data, *(cfg.adapter or [])], base)
    device = runtime.pick_device()
    base = load_base(base, runtime, device)
    model, tok, path = base
    for p, a in adapters:
        fitting(a, model.args, path, p).to(device)
    columns = [column(p, a, cfg.template or a.meta.get("template", "alpaca"), base) for p, a in adapters]
    if cfg.compare or not columns:  # the base answers as the adapter is asked
        template = cfg.template or (columns[0].template if columns else "alpaca")
        columns.insert(0, column("base", None, template, base))
    return model, tok, columns


def column(name: str, aligner, template: str, base: Base) -> Column:
    """A Column; its chat template is the one the adapter was trained with, else the model's own."""
    chat = base.chat(aligner) if template == "chat" else None
    return Column(name, aligner, template, chat, chat.stop_id if chat else base.tok.eos_id)
