"""Nothing lost, by design: the output gate, temporaries that belong to their run, --force over
this project's directories only, metrics that move with their adapter, SIGTERM, resume that means
the same run, converted configs checked before the directory is put in place.

Property tests (hypothesis) throw output paths and config.json values at the mechanisms; the rest
run real commands as subprocesses and then look at every file."""
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_hf_model, make_tokenizer_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train_generate import RECORDS, losses, train_args, wait_for_steps

import train
from support.adapter_file import RunFiles
from support.checkpoint import load_model
from convert_weights import convert
from support.errors import Terminated, UserError
from support.outputs import check_output_dir, check_output_file
from support import memory
from support.temporary import (MARKER, SUFFIX, StagedLines, added_folder, atomic_write, held_file,
                               new_directory, remove_leftovers)
from support.tolerance import assert_close, logits_sums


def files(folder: Path) -> dict:
    """Every entry under `folder` (links not followed): its bytes, or what it is."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() and not p.is_symlink() else \
            ("link", os.readlink(p)) if p.is_symlink() else stat.S_IFMT(p.lstat().st_mode)
    return out


# ---- the output gate, over many paths ---------------------------------------------------------------
NAMES = st.text(alphabet="ab*?[]{}.-_ ~", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))


@pytest.fixture
def room(tmp_path):
    """A user's folder: inputs, notes (hidden ones too), a FIFO, a subfolder, and links to each."""
    (tmp_path / "data.json").write_text("[]")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".notes.tmp").write_text("hidden, mine")
    (tmp_path / f".x.1.{'0' * 16}.tmp").write_text("looks like a temporary, but mine")
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for target in ("data.json", "model/model.safetensors", "notes.txt", "sub", "fifo", "nowhere"):
        (tmp_path / f"link-{target.replace('/', '-')}").symlink_to(tmp_path / target)
    return tmp_path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(NAMES, st.sampled_from(["data.json", "model/model.safetensors", "fifo", "sub", "sub/",
                                              "new/", "model", "/dev/null", "link-data.json", "link-fifo",
                                              "link-sub", "link-nowhere", "link-notes.txt", "*", ".*",
                                              "link-model-model.safetensors", "notes.txt/x"])))
def test_an_output_is_written_only_where_it_costs_nothing(room, name):
    """Either the gate refuses with a UserError, or the write changes that one regular file (new or
    a non-input) and nothing else; no path through a link, no device, FIFO or directory."""
    before = files(room)
    out = name if name.startswith("/") else str(room / name) + ("/" if name.endswith("/") else "")
    try:
        check_output_file(out, [room / "data.json"], [room / "model"])
    except UserError:
        assert files(room) == before
        return
    path = Path(out)
    assert not path.is_symlink() and (not path.exists() or path.is_file()) and not out.endswith("/")
    assert path.resolve().parent != (room / "model").resolve() or not path.exists()
    atomic_write(path, lambda f: f.write(b"written"))
    after = files(room)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {str(path.relative_to(room))} and path.read_bytes() == b"written"


def test_force_replaces_only_what_this_project_wrote(tmp_path):
    hf = tmp_path / "downloaded"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by this project"):
        check_output_dir(hf, force=True)
    with new_directory(tmp_path / "ours", "test") as tmp:
        (tmp / "params.json").write_text("{}")
    assert (tmp_path / "ours" / MARKER).is_file()
    check_output_dir(tmp_path / "ours", force=True)  # ours: allowed
    assert (hf / "notes.txt").read_text() == "mine"


def test_written_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with new_directory(tmp_path / "d", "test") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
            os.chmod(tmp / "w.bin", 0o600)  # as safetensors writes it
        atomic_write(tmp_path / "f.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d" / "w.bin").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640


# ---- temporaries that belong to their run ------------------------------------------------------------
def test_a_live_runs_temporary_is_kept_and_a_dead_runs_removed(tmp_path):
    target = tmp_path / "out.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".out.pt.{dead.stdout.strip()}.{'ab' * 8}{SUFFIX}"
    leftover.write_text("a run killed outright left this")
    mine = tmp_path / f".out.pt.{os.getpid()}.{'cd' * 8}{SUFFIX}"  # a live process: kept, lock or not
    mine.write_text("alive")
    with StagedLines(tmp_path / "out.metrics.jsonl", keep=False) as staged:
        staged.write({"step": 1})
        live = [p for p in tmp_path.iterdir() if p.name.startswith(".out.metrics.jsonl.")]
        remove_leftovers(tmp_path / "out.metrics.jsonl")
        remove_leftovers(target)
        assert all(p.exists() for p in live) and mine.exists() and not leftover.exists()
    assert not any(p.exists() for p in live)


def test_staged_metrics_move_only_with_a_save(tmp_path):
    path = tmp_path / "a.metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n')
    with pytest.raises(RuntimeError):
        with StagedLines(path, keep=False) as m:
            m.write({"step": 1, "loss": 9.0})
            raise RuntimeError("the run died before its first save")
    assert path.read_text() == '{"step": 1, "loss": 2.5}\n'
    with StagedLines(path, keep=True) as m:
        m.write({"step": 2, "loss": 2.0})
        m.publish()
    assert losses(path) == [2.5, 2.0]


def test_folders_made_for_an_output_go_with_a_run_that_wrote_nothing(tmp_path):
    """A run that stops before its first save (a loss that diverged at step 1), a failed write or a
    failed conversion leaves none of the folders it made for its output; a folder holding anything
    else stays, and so do the folders of an output that was written."""
    def fails(write):
        with pytest.raises(RuntimeError):
            write()
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    def staged(path):
        with StagedLines(path, keep=False) as m:
            m.write({"step": 1})
            raise RuntimeError("diverged before the first save")

    def converted(path):
        with new_directory(path, "test") as tmp:
            (tmp / "params.json").write_text("{}")
            raise RuntimeError("the conversion failed")

    def written(path):
        def half(f):
            f.write(b"half")
            raise RuntimeError("the writer failed")
        atomic_write(path, half)

    assert fails(lambda: staged(tmp_path / "a" / "b" / "out.metrics.jsonl")) == []
    assert fails(lambda: converted(tmp_path / "a" / "b" / "model")) == []
    assert fails(lambda: written(tmp_path / "a" / "b" / "out.pt")) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("the user's")
    assert fails(lambda: staged(tmp_path / "a" / "b" / "c" / "out.metrics.jsonl")) == ["a", "a/notes.txt"]
    (tmp_path / "empty").mkdir()  # a user's empty folder, named by a path through folders not yet there
    assert fails(lambda: staged(tmp_path / "x" / ".." / "empty" / "m.jsonl")) == ["a", "a/notes.txt", "empty"]
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UserError, match="cannot write"):
        staged(tmp_path / "file" / "sub" / "m.jsonl")
    atomic_write(tmp_path / "d" / "e" / "out.pt", lambda f: f.write(b"saved"))
    assert (tmp_path / "d" / "e" / "out.pt").read_bytes() == b"saved"


def test_a_directory_replaced_keeps_what_the_user_put_in_it_meanwhile(tmp_path):
    """The gate allowed `out` before the work (empty, or with --force only this project's files); a
    file put in it while the run worked stops the replacement with one line, and all of it stays."""
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(UserError, match="NOTES.txt"):
        with new_directory(out, "test") as tmp:
            (tmp / "params.json").write_text("new")
            (out / "NOTES.txt").write_text("mine")
    assert os.listdir(tmp_path) == ["m"] and os.listdir(out) == ["NOTES.txt"]
    (out / "NOTES.txt").unlink()
    with new_directory(out, "test") as tmp:
        (tmp / "params.json").write_text("old")
    with pytest.raises(UserError, match="holds mine"):  # --force over a directory of ours: the same
        with new_directory(out, "test") as tmp:
            (tmp / "params.json").write_text("new")
            (out / "mine").mkdir()
            (out / "mine" / "results.csv").write_text("mine")
    assert (out / "params.json").read_text() == "old" and (out / "mine" / "results.csv").read_text() == "mine"
    shutil.rmtree(out / "mine")
    for name, put in [("an empty folder", lambda: (out / "empty").mkdir()),
                      ("notes in __pycache__", lambda: (out / "__pycache__").mkdir() or
                       (out / "__pycache__" / "notes.txt").write_text("mine"))]:
        with pytest.raises(UserError, match="put there while this run worked"):
            with new_directory(out, "test") as tmp:
                (tmp / "params.json").write_text("new")
                put()
        assert (out / "params.json").read_text() == "old", name
        shutil.rmtree(out / ("empty" if "empty" in name else "__pycache__"))
    shutil.rmtree(out)
    for name, put in [("a file", lambda: out.write_text("mine")), ("a link", lambda: out.symlink_to(tmp_path)),
                      ("a FIFO", lambda: os.mkfifo(out))]:  # the output itself, made while the run worked
        with pytest.raises(UserError, match="put there while this run worked"):
            with new_directory(out, "test") as tmp:
                (tmp / "params.json").write_text("new")
                put()
        assert os.listdir(tmp_path) == ["m"] and not out.is_dir() or out.is_symlink(), name
        out.unlink()
    with pytest.raises(UserError, match="ends in .."):
        check_output_dir(f"{tmp_path}/m/..")


def test_a_signal_while_a_directory_is_replaced_leaves_one_whole(tmp_path, monkeypatch):
    """SIGTERM at the worst moment, right after the old `out` goes (removed, or renamed aside), leaves
    `out` whole (the old one or the new) and no temporary."""
    out = tmp_path / "m"
    with new_directory(out, "test") as tmp:
        (tmp / "w.txt").write_text("old")

    class Stop(Exception):
        pass

    def signalled(real):
        def call(path, *rest, **kw):
            real(path, *rest, **kw)
            if Path(path) == out:
                os.kill(os.getpid(), signal.SIGTERM)
        return call

    def stop(signum, frame):
        raise Stop

    monkeypatch.setattr(os, "rename", signalled(os.rename))
    monkeypatch.setattr(shutil, "rmtree", signalled(shutil.rmtree))
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop):
            with new_directory(out, "test") as tmp:
                (tmp / "w.txt").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.listdir(tmp_path) == ["m"] and (out / "w.txt").read_text() in ("old", "new")


def test_an_output_another_run_is_writing_is_refused_however_it_is_named(tmp_path):
    """A directory output another live run is making is refused, as a file is; so is a file named
    through a link and `..` (link/../out.pt is real/out.pt when link is real/inner)."""
    (tmp_path / "real" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "inner")
    code = ("import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[3])\n"
            "from support.temporary import held_file, new_directory\n"
            "with new_directory(Path(sys.argv[1]), 'test'), held_file(Path(sys.argv[2])):\n"
            "    print('ready', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "real" / "out.pt"),
                              str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        with pytest.raises(UserError, match="being written by another run"):
            check_output_dir(tmp_path / "m")
        with pytest.raises(UserError, match="being written by another run"):
            check_output_file(tmp_path / "link" / ".." / "out.pt")
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("name, words", [
    ("loop/sub/out.pt", "loop is a symbolic link"), ("absent/out.pt", "absent is a symbolic link to gone"),
    ("file/../out.pt", "file is a file, not a folder"), ("new/.", "names a directory"),
    ("new/..", "names a directory")])
def test_a_name_the_file_system_reads_otherwise_is_one_line(tmp_path, name, words):
    """Links that loop or lead nowhere, a file where a folder should be, a name ending in /. (which
    pathlib reads as the folder): each refused by the gate with one line, as an output file, the
    first three as an output directory, and a looping input passes the gate's comparison."""
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "absent").symlink_to("gone")
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UserError, match=words):
        check_output_file(f"{tmp_path}/{name}", inputs=[tmp_path / "loop"])
    if not name.endswith("."):
        with pytest.raises(UserError, match=words):
            check_output_dir(Path(f"{tmp_path}/{name}").parent / "model", sources=[tmp_path / "loop"])
    assert sorted(os.listdir(tmp_path)) == ["absent", "file", "loop"]


def test_metrics_without_their_checkpoint_are_another_runs(tmp_path):
    """a.pt, a.ckpt and a share a.metrics.jsonl: a run whose metrics may be another checkpoint's is
    refused before it replaces them, as is an --out named as a metrics file, while a run again on its
    own --out (its checkpoint there, no other) and --resume go on."""
    (tmp_path / "a.pt").write_bytes(b"checkpoint")
    (tmp_path / "a.metrics.jsonl").write_text('{"step": 1}\n')
    for out in ("a.ckpt", "a", "a.metrics.jsonl", "b.metrics.jsonl"):  # another's, or a metrics name
        with pytest.raises(UserError, match="metrics"):
            RunFiles(tmp_path / out, [], None, resume=False)
    assert (tmp_path / "a.metrics.jsonl").read_text() == '{"step": 1}\n'
    assert RunFiles(tmp_path / "a.pt", [], None, resume=False).metrics == tmp_path / "a.metrics.jsonl"
    assert RunFiles(tmp_path / "a.pt", [], None, resume=True).metrics == tmp_path / "a.metrics.jsonl"
    (tmp_path / "a.ckpt").write_bytes(b"another checkpoint")  # now a.metrics.jsonl may be either's
    for resume in (False, True):
        with pytest.raises(UserError, match="a.ckpt"):
            RunFiles(tmp_path / "a.pt", [], None, resume=resume)
    assert (tmp_path / "a.metrics.jsonl").read_text() == '{"step": 1}\n'


def test_two_runs_on_one_out_the_second_refused(tiny, tmp_path):
    """While a training runs, a second run on the same --out is refused with one line before any
    work (their metrics would interleave); the first, its staged metrics untouched, is then stopped
    with Ctrl-C and still saves."""
    _, path = tiny
    (tmp_path / "data.json").write_text(json.dumps(RECORDS))
    out = tmp_path / "same.pt"
    first = subprocess.Popen([sys.executable, "train.py", *train_args(path, tmp_path / "data.json", out,
                                                                      "--max-steps", "100000", "--eval-every", "0",
                                                                      "--save-every", "0")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(tmp_path, "same.metrics.jsonl", 2)
    staged = [p for p in tmp_path.iterdir() if p.name.endswith(SUFFIX)]
    second = subprocess.run([sys.executable, "train.py", *train_args(path, tmp_path / "data.json", out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 2 and "being written by another run" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert staged and all(p.exists() for p in staged)  # the live run's temporary was left alone
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    step = torch.load(out, weights_only=True)["step"]
    assert step >= 2 and len(losses(tmp_path / "same.metrics.jsonl")) == step


# ---- resume means the same run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    (folder / "data.json").write_text(json.dumps(RECORDS))
    train.main(train_args(tiny[1], folder / "data.json", folder / "c.pt", "--max-steps", "2", "--tokens", "2"))
    (folder / "i.pt").write_bytes((folder / "c.pt").read_bytes())  # an adapter to name with --init
    return folder


@pytest.mark.parametrize("flags, words", [
    (["--tokens", "5"], "--tokens is 5 here, but"), (["--per-layer", "--tokens", "2"], "--per-layer"),
    (["--start-layer", "3", "--tokens", "2"], "--start-layer"), (["--tokens", "2", "--template", "raw"], "--template"),
    (["--tokens", "2", "--init", "i.pt"], "--init")])
def test_resume_refuses_flags_that_define_another_run(tiny, checkpoint, flags, words):
    flags = [str(checkpoint / f) if f.endswith(".pt") else f for f in flags]
    before = files(checkpoint)
    r = subprocess.run([sys.executable, "train.py", *train_args(tiny[1], checkpoint / "data.json",
                                                                checkpoint / "c.pt", "--resume", *flags)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert files(checkpoint) == before


@pytest.mark.parametrize("damage, words", [
    (lambda d: {**d, "step": -3}, "step -3"), (lambda d: {**d, "step": 2.5}, "step 2.5"),
    (lambda d: {**d, "optimizer": {"state": {}, "param_groups": "x"}}, "optimizer state"),
    (lambda d: {**d, "optimizer": {**d["optimizer"], "state": {0: {"exp_avg": torch.zeros(3)}}}}, "optimizer state"),
    (lambda d: {**d, "optimizer": {**d["optimizer"], "state": {
        k: {**v, "exp_avg_sq": torch.full_like(v["exp_avg_sq"], float("nan"))}
        for k, v in d["optimizer"]["state"].items()}}}, "exp_avg_sq")])
def test_a_damaged_checkpoint_is_one_line(tiny, checkpoint, tmp_path, damage, words):
    d = torch.load(checkpoint / "c.pt", weights_only=True)
    torch.save(damage(d), tmp_path / "c.pt")
    r = subprocess.run([sys.executable, "train.py", *train_args(tiny[1], checkpoint / "data.json",
                                                                tmp_path / "c.pt", "--resume", "--tokens", "2")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- converted configs, checked before the directory is put in place ---------------------------------
@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf") / "src"
    make_hf_model().save_pretrained(src)
    make_tokenizer_json(src)
    return src


NAN = st.just(float("nan"))
CONFIG_VALUES = {"rope_theta": st.one_of(st.just(10000.0), st.floats(-1e6, 1e6), NAN),
                 "rms_norm_eps": st.one_of(st.just(1e-5), st.floats(-1.0, 1.0), NAN),
                 "num_key_value_heads": st.one_of(st.just(2), st.integers(-2, 6), st.none()),
                 "hidden_act": st.sampled_from(["silu", "gelu", "relu", "swish", 3]),
                 "sliding_window": st.one_of(st.none(), st.integers(-1, 300), st.just("4")),
                 "bos_token_id": st.one_of(st.just(1), st.integers(-1, 400), st.none()),
                 "max_position_embeddings": st.one_of(st.just(256), st.integers(-1, 512))}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.fixed_dictionaries({}, optional=CONFIG_VALUES))
def test_a_converted_directory_loads_and_runs_or_is_not_written(hf_source, tmp_path_factory, changes):
    work = tmp_path_factory.mktemp("c")
    src = work / "src"
    os.symlink(hf_source, work / "orig")
    src.mkdir()
    for f in hf_source.iterdir():
        (src / f.name).symlink_to(f)
    (src / "config.json").unlink()
    cfg = json.loads((hf_source / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **changes}))
    try:
        convert(str(src), work / "out")
    except UserError:
        assert sorted(p.name for p in work.iterdir()) == ["orig", "src"]  # nothing written, no leftover
        return
    model = load_model(work / "out")  # it loads, and runs to finite logits within its context
    ids = torch.arange(min(8, model.args.max_seq_len))[None]  # (1, T)
    assert torch.isfinite(model(ids)).all()
    window = changes.get("sliding_window")
    if isinstance(window, int) and window < cfg["max_position_embeddings"] and changes.get(
            "max_position_embeddings", 256) > window:
        assert model.args.max_seq_len == window


@pytest.mark.numeric
def test_a_short_sliding_window_limits_the_context_exactly(tmp_path):
    """A Mistral with a 4-token window equals full attention on its first 4 positions, and the
    converted model's context is 4: transformers and ours agree there, and a longer prompt is refused."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=4, bos_token_id=1, eos_token_id=2)
    m = MistralForCausalLM(cfg).eval()
    m.save_pretrained(tmp_path / "src")
    make_tokenizer_json(tmp_path / "src")
    convert(str(tmp_path / "src"), tmp_path / "out")
    ours = load_model(tmp_path / "out")
    assert ours.args.max_seq_len == 4
    ids = torch.tensor([[5, 9, 200, 17]])  # (1, 4)
    with torch.no_grad():
        assert_close(ours(ids), m(ids).logits, **logits_sums(ours.args, ids.shape[1]), what="logits")


def test_sigterm_during_a_conversion_leaves_nothing(tmp_path):
    """A checkpoint big enough to take a while; SIGTERM once its temporary directory exists: exit 143,
    no output, no temporary left."""
    make_hf_model(layers=24, dim=256).save_pretrained(tmp_path / "src")
    make_tokenizer_json(tmp_path / "src")
    proc = subprocess.Popen([sys.executable, "convert_weights.py", str(tmp_path / "src"), str(tmp_path / "out")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(SUFFIX) for p in tmp_path.iterdir()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], stderr
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr


# ---- edges of generation ------------------------------------------------------------------------------
def test_closed_stdin_and_a_tiny_temperature(tiny, tmp_path):
    _, path = tiny
    r = subprocess.run(f"{sys.executable} generate.py --model {path} --device cpu <&-", shell=True, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: standard input is closed and no --prompt or --data was given: nothing to answer"], r.stderr
    r = subprocess.run([sys.executable, "generate.py", "--model", str(path), "--device", "cpu", "--prompt", "Hi",
                        "--temperature", "1e-30", "--max-new-tokens", "3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


# ---- the edges: every write failure one line, the old file intact; sizes checked before allocation -------
def no_temporaries(folder: Path) -> bool:
    return not any(p.name.endswith(SUFFIX) for p in folder.rglob("*"))


def test_a_save_past_the_file_size_limit_is_one_line_and_keeps_the_old_file(tiny, tmp_path):
    """`ulimit -f` of 10,000 bytes: a 64-token checkpoint (about 50 KB) cannot be written; torch.save
    reports that as a RuntimeError of its own, and the command still says why in one line."""
    (tmp_path / "data.json").write_text(json.dumps(RECORDS))
    out = tmp_path / "a.pt"
    out.write_bytes(b"the last good adapter")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))  # noqa: E731
    r = subprocess.run([sys.executable, "train.py", *train_args(tiny[1], tmp_path / "data.json", out,
                                                                "--max-steps", "1", "--eval-every", "0",
                                                                "--tokens", "64")],
                       cwd=ROOT, capture_output=True, text=True, preexec_fn=limit,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: cannot write {out}: the file is larger than this process may "
                                             f"write (ulimit -f); {out} is as it was before this run"], r.stderr
    assert out.read_bytes() == b"the last good adapter" and no_temporaries(tmp_path)


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tiny, hf_source, tmp_path):
    """A 64 KiB tmpfs, nearly full: the answers cannot be written (ENOSPC), nor a converted model
    (safetensors reports it as an error of its own)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        (mnt / "answers.jsonl").write_text("the answers of the last run\n")
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:  # ENOSPC: the disk is full
            pass
        finally:
            os.close(fd)
        (tmp_path / "p.txt").write_text("\n".join(f"question {i}" for i in range(64)))
        r = subprocess.run([sys.executable, "generate.py", "--model", str(tiny[1]), "--data", str(tmp_path / "p.txt"),
                            "--out", str(mnt / "answers.jsonl"), "--max-new-tokens", "8", "--device", "cpu"],
                           cwd=ROOT, capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and "Traceback" not in r.stderr and lines[-1] == (
            f"error: cannot write {mnt / 'answers.jsonl'}: the disk is full; {mnt / 'answers.jsonl'} is as it was "
            f"before this run"), r.stderr
        assert (mnt / "answers.jsonl").read_text() == "the answers of the last run\n" and no_temporaries(mnt)
        r = subprocess.run([sys.executable, "convert_weights.py", str(hf_source), str(mnt / "c")], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
            f"error: cannot write {mnt / 'c'}: the disk is full"), r.stderr
        assert sorted(p.name for p in mnt.iterdir()) == ["answers.jsonl", "filler"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("signal_error", [KeyboardInterrupt, Terminated])
def test_a_signal_during_a_save_keeps_the_old_file(tmp_path, signal_error):
    path = tmp_path / "a.pt"
    path.write_bytes(b"old")

    def half_then_signal(f):
        f.write(b"half of the new file")
        raise signal_error()

    with pytest.raises(signal_error):
        atomic_write(path, half_then_signal)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_the_write_itself_never_replaces_a_device_or_a_fifo(tmp_path):
    """Even a write that skipped the gate leaves a device a device (root could replace /dev/null with a
    file: the test makes its own null device, so that a wrong version breaks nothing outside tmp_path)."""
    os.mkfifo(tmp_path / "fifo")
    paths = [tmp_path / "fifo"]
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        paths.append(tmp_path / "null")
    except PermissionError:  # not root: the FIFO alone
        pass
    for path in paths:
        with pytest.raises(UserError, match="not a regular file"):
            atomic_write(path, lambda f: f.write(b"x"))
    assert all(not stat.S_ISREG(os.lstat(path).st_mode) for path in paths)


def test_force_needs_a_marker_that_lists_every_file(tmp_path):
    """--force removes only what the project wrote: a marker without a list of files (an older version),
    or a file the marker does not list (the user's notes), stops it; Python's caches do not."""
    with new_directory(tmp_path / "ours", "test") as tmp:
        (tmp / "model.py").write_text("ours")
    (tmp_path / "ours" / "__pycache__").mkdir()
    (tmp_path / "ours" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"cache")
    check_output_dir(tmp_path / "ours", force=True)
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt, which this project did not write"):
        check_output_dir(tmp_path / "ours", force=True)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MARKER).write_text('{"written_by": "aligner", "source": "x"}\n')
    (tmp_path / "old" / "params.json").write_text("{}")
    with pytest.raises(UserError, match="lists no files"):
        check_output_dir(tmp_path / "old", force=True)


def test_a_folder_a_run_adds_to_is_held(tmp_path):
    """The experiment's results folder: a second run adding to it at the same time is refused."""
    with added_folder(tmp_path / "results", "test", ["cells.jsonl"]):
        child = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; sys.path.insert(0, '.');"
                                "from support.temporary import added_folder; from support.errors import run_main;"
                                f"run_main(lambda: added_folder(Path({str(tmp_path / 'results')!r}), 't', []).__enter__())"],
                               cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 2 and "in use by another run" in child.stderr, child.stderr
    check_output_dir(tmp_path / "results", add=True)  # its own marker: added to without --force


def test_an_error_under_a_progress_bar_starts_its_own_line(tiny, tmp_path):
    """A prompt past the context stops `generate.py --data` while its bar is on screen."""
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "hi"}] * 3 + [{"instruction": "word " * 400}]))
    r = subprocess.run([sys.executable, "generate.py", "--model", str(tiny[1]), "--data", str(tmp_path / "p.json"),
                        "--out", str(tmp_path / "a.jsonl"), "--batch-size", "1", "--max-new-tokens", "1",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "answers:" in r.stderr, r.stderr
    error = next(line for line in r.stderr.split("\n") if "error:" in line)
    assert error.startswith("error: a prompt is"), r.stderr


def test_a_path_that_is_not_utf8_and_data_from_stdin(tiny, tmp_path):
    """An --out of bytes that are not UTF-8 is written and printed as those bytes; --data /dev/stdin
    (a pipe) is read like a file."""
    out = os.fsencode(tmp_path) + b"/caf\xe9.pt"
    args = [*map(os.fsencode, train_args(tiny[1], "/dev/stdin", "x", "--max-steps", "1", "--eval-every", "0"))]
    r = subprocess.run([os.fsencode(sys.executable), b"train.py", *args, b"--out", out], cwd=ROOT,
                       capture_output=True, input=json.dumps(RECORDS).encode(),
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})  # strict, as under a UTF-8 locale
    assert r.returncode == 0 and os.path.isfile(out) and b"saved " + out in r.stdout, r.stderr


def test_the_memory_floor_refuses_only_what_cannot_fit(tiny, monkeypatch):
    """The README's runs on the embedded 135M model (batch 64 of 8, and generation of 64 rows) need
    far less than a laptop has; an absurd size is refused with both numbers, before any allocation."""
    from model import CONFIGS
    from support.flags import Runtime

    cpu = torch.device("cpu")
    for micro, most in ((8, 2**30), (64, 2 * 2**30)):  # the README's batch 64 of 8, and of 64 at once
        readme = train.TrainConfig(data="d.json", batch_size=64, micro_batch_size=micro)
        assert memory.training_bytes(readme, CONFIGS["smollm2-135m"], Runtime(device="cpu"), cpu) < most
    monkeypatch.setattr(memory, "available", lambda device: 2 * 2**30)
    memory.check_training(train.TrainConfig(data="d.json"), tiny[1], Runtime(device="cpu"), cpu)
    for flags in ({"tokens": 10**8}, {"micro_batch_size": 10**7, "batch_size": 10**7}, {"batch_size": 10**9}):
        with pytest.raises(UserError, match=r"needs at least [\d,.]+ GiB on cpu, and 2.0 GiB are free"):
            memory.check_training(train.TrainConfig(data="d.json", **flags), tiny[1], Runtime(device="cpu"), cpu)
    model = load_model(tiny[1])
    sampling = type("S", (), {"max_new_tokens": 100})
    assert memory.checked_length(model, [30] * 200, 64, sampling) == 130
    with pytest.raises(UserError, match="decoding 1,000,000 rows"):
        memory.checked_length(model, [30] * 10**6, 10**6, sampling)
