"""serve.py's throughput on loopback: total tokens/s and p50/p95 latency for 1, 8 and 32 concurrent
clients, all on one shared Aligner and each on its own, with a fixed answer length.

    python benchmarks/serve_bench.py                  # the embedded default on the CPU (a few minutes)
    python benchmarks/serve_bench.py --requests 8 --clients 1 8   # smaller
    python benchmarks/serve_bench.py --model DIR --device cuda --context 1024   # real weights, a GPU

It writes 32 Aligners with random non-zero gates (speed does not depend on what they learned) to a
temporary folder, starts `serve.py --adapters` on a free loopback port, and sends the same requests
(greedy, `ignore_eos`, --new-tokens each) in bounded loops: one client at a time is the baseline.
Read next: docs/serving.md (where its figures are recorded).
"""
import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner import Aligner  # noqa: E402
from support.adapter_file import save_aligner  # noqa: E402
from support.checkpoint import read_params  # noqa: E402
from support.convert import model_dir  # noqa: E402
from support.errors import run_main  # noqa: E402
from support.flags import path_text, positive_int  # noqa: E402
from support.outputs import check_output_file  # noqa: E402
from support.temporary import write_jsonl  # noqa: E402


def write_aligners(folder: Path, base: Path, n: int):
    """n one-token Aligners with random non-zero gates, trained on nothing, for timing only."""
    args = read_params(base / "params.json")
    for i in range(n):
        torch.manual_seed(i)
        a = Aligner(args, 1, 2, False, {"base": str(base.resolve()), "template": "raw"})
        with torch.no_grad():
            a.gates.normal_(0, 0.1)
        save_aligner(a, folder / f"a{i:02d}.pt")


def start_server(folder: Path, base: Path, flags) -> tuple:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "serve.py"), "--adapters", str(folder), "--model", str(base),
           "--port", str(port), "--slots", str(max(flags.clients)), "--context", str(flags.context),
           "--device", flags.device]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    for _ in range(600):  # bounded: at most five minutes to load
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            return proc, port
        except OSError:
            if proc.poll() is not None:
                sys.exit("serve.py did not start")
            time.sleep(0.5)
    proc.kill()
    sys.exit("serve.py did not answer within five minutes")


def ask(port: int, model: str, prompt: str, new_tokens: int) -> tuple:
    """(completion tokens, seconds) of one greedy request."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        usage = json.loads(r.read())["usage"]
    return usage["completion_tokens"], time.perf_counter() - t0


def run(port: int, clients: int, distinct: bool, flags) -> dict:
    """`flags.requests` requests from `clients` concurrent clients, each sending its share in turn."""
    def client(c: int):
        model = f"a{c:02d}" if distinct else "a00"
        return [ask(port, model, f"Request {c}-{i}: tell me about the sea.", flags.new_tokens)
                for i in range(flags.requests // clients)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    latencies = sorted(t for _, t in results)
    return {"clients": clients, "aligners": "distinct" if distinct else "shared", "requests": len(results),
            "tokens_per_s": sum(n for n, _ in results) / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "wall_s": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="converted base model directory (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=positive_int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=positive_int, default=32,
                   help="requests per measurement (a multiple of each --clients)")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--context", type=positive_int, default=256)
    p.add_argument("--out", type=path_text, help="also write the rows as JSON lines here")
    run_main(measure, p.parse_args(argv))


def measure(flags):
    base = model_dir(flags.model)
    if flags.out:  # the output gate, before any work
        check_output_file(flags.out, input_dirs=[base])
    with tempfile.TemporaryDirectory() as tmp:
        write_aligners(Path(tmp), base, max(flags.clients))
        proc, port = start_server(Path(tmp), base, flags)
        try:
            ask(port, "a00", "warm up", 4)
            rows = [run(port, c, distinct, flags) for distinct in (False, True) for c in flags.clients]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    one = rows[0]["tokens_per_s"]
    print(f"{'clients':>7} {'aligners':>9} {'tokens/s':>9} {'x one-at-a-time':>16} {'p50 s':>7} {'p95 s':>7}")
    for r in rows:
        ratio = r["tokens_per_s"] / one
        print(f"{r['clients']:>7} {r['aligners']:>9} {r['tokens_per_s']:>9.1f} {ratio:>16.2f} "
              f"{r['p50_s']:>7.2f} {r['p95_s']:>7.2f}")
    if flags.out:
        write_jsonl(flags.out, rows)


if __name__ == "__main__":
    main()
