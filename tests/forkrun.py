"""The project's command lines run as separate processes, without paying torch's import (about 2 s on
two cores) for each: a server process imports torch and the project's modules once, then forks a
child per command, which runs the script as `python SCRIPT ARGS` would (as __main__, in its own
working directory, environment, standard input and output files) and exits with its exit code.

    result = run_text(["train.py", "--batch-size", "0"])  # CompletedProcess, text, in the checkout
    with Servers(2, env) as servers:   # a pool of one's own
        result = servers.run(["train.py", "--batch-size", "0"], cwd, env, stdin=b"")

Used by the tests that run command lines for their exit code, their output and the files they
write (tests/test_bad_input.py's table of bad command lines, run_cli in test_model.py and
test_chat.py); a real interpreter start is still checked by every test that runs a command with
subprocess (signals, torchrun, the server). The server does no torch work before forking, so no
thread pool is copied into a child; the commands run with one thread (OMP_NUM_THREADS=1), two at a
time.
Read next: tests/test_bad_input.py.
"""
import atexit
import json
import os
import queue
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, runpy, sys, traceback
sys.path.insert(0, ROOT)
import torch, numpy, tqdm  # noqa: F401  the imports every command pays for
import train, generate, adapter, data, model, aligner  # noqa: F401
requests = sys.stdin.buffer
while True:
    line = requests.readline()
    if not line:
        break
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: the command
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, (name, flags) in enumerate([(job["stdin"], os.O_RDONLY), (job["stdout"], os.O_WRONLY),
                                            (job["stderr"], os.O_WRONLY)]):
            os.dup2(os.open(name, flags), fd)
        sys.stdin = open(0, closefd=False)
        sys.argv = job["argv"]
        sys.path[0] = os.path.dirname(os.path.abspath(job["argv"][0]))
        try:
            runpy.run_path(job["argv"][0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        raise SystemExit(code)  # as the interpreter exits: atexit handlers, flushed streams
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
    sys.stdout.flush()
"""


class Servers:
    """`n` fork servers (n commands at a time), started with `env` (OMP_NUM_THREADS and the like
    are read when torch loads, so every command run through them shares those)."""

    def __init__(self, n: int, env: dict):
        code = SERVER.replace("ROOT", repr(str(ROOT)))
        self.idle = queue.Queue()
        for _ in range(n):
            self.idle.put(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, env={**os.environ, **env}, cwd=ROOT))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        while not self.idle.empty():
            server = self.idle.get()
            server.stdin.close()
            server.wait(timeout=60)

    def run(self, argv: list, cwd, env: dict, stdin: bytes = b"") -> subprocess.CompletedProcess:
        """`python ARGV` in `cwd` with the environment `env` and `stdin`: as subprocess.run with
        capture_output=True."""
        server = self.idle.get()
        try:
            with tempfile.TemporaryDirectory(prefix="aligner-fork-") as d:
                files = {name: Path(d) / name for name in ("stdin", "stdout", "stderr")}
                files["stdin"].write_bytes(stdin)
                for name in ("stdout", "stderr"):
                    files[name].touch()
                job = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env,
                       **{name: str(path) for name, path in files.items()}}
                server.stdin.write((json.dumps(job) + "\n").encode())
                server.stdin.flush()
                code = json.loads(server.stdout.readline())
                return subprocess.CompletedProcess(argv, code, files["stdout"].read_bytes(),
                                                   files["stderr"].read_bytes())
        finally:
            self.idle.put(server)


_SHARED = []


def shared() -> Servers:
    """Two servers for the whole test session (one thread each), closed when it ends."""
    if not _SHARED:
        _SHARED.append(Servers(2, {"OMP_NUM_THREADS": "1"}))
        atexit.register(_SHARED[0].__exit__)
    return _SHARED[0]


def run_text(argv: list, input: str = "", cwd=ROOT) -> subprocess.CompletedProcess:
    """`python ARGV` in `cwd` (the checkout) with this environment: as subprocess.run with
    capture_output=True, text=True and `input`."""
    r = shared().run(argv, cwd, dict(os.environ), input.encode())
    return subprocess.CompletedProcess(argv, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))
