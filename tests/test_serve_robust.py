"""One client never costs the others: the serving engine and server under failures, strangers' templates,
SIGTERM, slow readers and a full queue.

In process (the engine alone, on the tiny model): a request that fails inside the engine fails alone and
the others get the answers they get alone; a step that fails fails its rows, three in a row stop the
engine, which /health then says. Over loopback (a real serve.py process): a chat template that loops on
one message is stopped within its time limit while /health answers; SIGTERM with 16 open streams ends
each with a final event and [DONE], exit 0, no traceback; 40 clients that never read and a full queue do
not keep a short request out; start-up refuses a bad key and a port in use before "serving".

Run: .venv/bin/python -m pytest -q tests/test_serve_robust.py"""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT
from test_model import nonzero_aligner
from test_serve import free_port

from generate import Sampling
from support.adapter_file import column, save_aligner
from support.checkpoint import load_base, load_model
from support.flags import Runtime

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
SPIN = ("{% for m in messages %}{% if m['content'] == 'spin' %}{% for i in range(100000) %}"
        "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


# ---- the engine in process -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_parts(tiny):
    from serving.engine import Engine, Limits

    _, path = tiny
    base = load_base(path, Runtime(), torch.device("cpu"))
    model, tok = base.model, base.tok
    a = nonzero_aligner(model.args, 2, seed=5)
    served = {"base": column("base", None, "raw", base), "a": column("a", a, "raw", base)}

    def start():
        engine = Engine(model, tok, served, Limits(slots=4, context=128))
        threading.Thread(target=engine.run, daemon=True).start()
        return engine

    return start, served, tok


def ask(engine, served, name, ids, temperature=0.0, n=8):
    """The events of one request, (kind, value) in order, once it has ended (bounded: 60 s)."""
    from serving.engine import Request

    done, events = threading.Event(), []

    def put(kind, value):
        events.append((kind, value))
        if kind in ("done", "error"):
            done.set()

    r = Request(ids, served[name], Sampling(n, temperature, 0, 1.0, 7), n, [], put, ignore_eos=True)
    engine.submit(r)
    return r, done, events


def answers(engine, served, jobs) -> list:
    started = [ask(engine, served, *job) for job in jobs]
    for _, done, _ in started:
        assert done.wait(60)
    return [events for _, _, events in started]


def test_a_request_that_fails_in_the_engine_fails_alone(engine_parts):
    start, served, tok = engine_parts
    engine = start()
    jobs = [("a", tok.encode("the quick brown fox")), ("base", tok.encode("hello")), ("a", tok.encode("x y"))]
    alone = [answers(engine, served, [job])[0] for job in jobs]
    poisoned = ("a", tok.encode("poison"), 1e-300)  # 0 in float32: 0/0 in the sampling (the HTTP side refuses it)
    together = answers(engine, served, [jobs[0], poisoned, jobs[1], jobs[2]])
    assert together[1][-1][0] == "error" and "failed on this request" in together[1][-1][1][1]
    assert [together[0], together[2], together[3]] == alone and all(e[-1][0] == "done" for e in alone)
    assert engine.failure is None and answers(engine, served, [jobs[0]])[0] == alone[0]
    engine.stopping.set()


def test_a_failed_step_fails_its_rows_and_three_in_a_row_stop_the_engine(engine_parts, monkeypatch):
    start, served, tok = engine_parts
    engine = start()
    real, calls = engine.runner.step, []

    def flaky(slots, group):
        calls.append(len(slots))
        if len(calls) <= fails:
            raise RuntimeError("device lost")
        return real(slots, group)

    fails = 1
    monkeypatch.setattr(engine.runner, "step", flaky)
    first = answers(engine, served, [("a", tok.encode("hello"))])[0]
    assert first[-1][0] == "error" and "decoding step failed" in first[-1][1][1]
    assert answers(engine, served, [("a", tok.encode("hello"))])[0][-1][0] == "done"
    assert engine.health()["status"] == "ok"
    calls.clear()
    fails = 3
    for _ in range(3):
        assert answers(engine, served, [("base", tok.encode("hi"))])[0][-1][0] == "error"
    assert engine.health()["status"] == "failed" and "3 times in a row" in engine.health()["error"]
    from serving.schema import ApiError

    with pytest.raises(ApiError) as e:
        ask(engine, served, "base", tok.encode("hi"))
    assert e.value.status == 503
    engine.stopping.set()


def test_a_client_that_takes_nothing_is_cut_and_one_that_reads_is_not(engine_parts):
    """With a stall limit of 0 s, a request whose events are never taken ends at the next step with an
    error that says why, its slot freed; the same request whose events are taken runs to its end."""
    from serving.engine import Engine, Limits, Request

    start, served, tok = engine_parts
    model = start().runner.model
    engine = Engine(model, tok, served, Limits(slots=2, context=128, stall_seconds=0.0))
    threading.Thread(target=engine.run, daemon=True).start()
    ended = {}
    for reads in (False, True):
        done, events = threading.Event(), []

        def put(kind, value, events=events, done=done, reads=reads):
            events.append((kind, value))
            if reads:
                r.taken()
            if kind in ("done", "error"):
                done.set()

        r = Request(tok.encode("the quick brown fox"), served["a"], Sampling(100, 0.0, 0, 1.0, 0), 100, [], put,
                    ignore_eos=True)
        engine.submit(r)
        assert done.wait(60)
        ended[reads] = events[-1]
    assert ended[False][0] == "error" and "read nothing" in ended[False][1][1]
    assert ended[True][0] == "done" and engine.health()["free"] == 2
    engine.stopping.set()


# ---- a real server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """The tiny model with a context of 2,048: answers long enough to fill a socket's buffers."""
    from conftest import convert, make_hf_model, make_tokenizer_json

    tmp = tmp_path_factory.mktemp("long")
    m = make_hf_model()
    m.config.max_position_embeddings = 2048
    m.save_pretrained(tmp / "hf")
    make_tokenizer_json(tmp / "hf")
    return m, convert(str(tmp / "hf"), tmp / "ours")


def adapters(tiny, folder):
    _, path = tiny
    args = load_model(path).args
    files = []
    for name, template, seed in (("a1", "alpaca", 3), ("spin", "chat", 4)):
        a = nonzero_aligner(args, 1, seed=seed)
        a.meta.update(base=str(path.resolve()), template=template)
        a.meta.update({"chat_template": SPIN} if template == "chat" else {})
        files += [folder / f"{name}.pt"]
        save_aligner(a, files[-1])
    return files


def start_server(files, *flags):
    port = free_port()
    cmd = [sys.executable, "serve.py", *[x for f in files for x in ("--adapter", str(f))], "--port", str(port),
           *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for _ in range(120):  # bounded: at most a minute to start
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
    raise AssertionError("the server did not start")


@pytest.fixture()
def server(long_tiny, tmp_path):
    proc, url = start_server(adapters(long_tiny, tmp_path), "--slots", "4", "--queue", "8", "--context", "2048",
                             "--stall-timeout", "2", "--grace", "1")
    yield proc, url
    if proc.poll() is None:
        proc.kill()


def stream_events(url, body, out: list):
    """Every `data:` line of one streamed answer, appended to out as it comes."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        out.append(r.status_code)
        if r.status_code != 200:
            out.append(r.read().decode())
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])


def test_a_looping_template_is_cut_at_its_limit_while_the_server_answers(server):
    proc, url = server
    body = {"model": "spin", "messages": [{"role": "user", "content": "spin"}], "max_tokens": 3}
    with ThreadPoolExecutor(1) as pool:
        spinning = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
        time.sleep(0.3)
        t = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
        assert time.monotonic() - t < 1.0
        r = spinning.result()
    assert r.status_code == 400 and "took more than" in r.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                    json={"model": "spin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200
    pool = ThreadPoolExecutor(1)
    pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # while a template spins in a worker thread
    assert proc.wait(timeout=15) == 0 and "Traceback" not in proc.stderr.read()
    pool.shutdown(wait=False)


def open_streams(url, n: int):
    """(outs, threads): n streamed 2,000-token answers started, once the 4 slots stream (bounded)."""
    outs = [[] for _ in range(n)]
    body = {"model": "a1", "prompt": "the quick brown fox", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True}
    threads = [threading.Thread(target=stream_events, args=(url, body, out)) for out in outs]
    for t in threads:
        t.start()
    for _ in range(200):
        if sum(len(o) > 2 for o in outs) >= 4:
            break
        time.sleep(0.05)
    return outs, threads


def test_sigterm_with_sixteen_open_streams_ends_each_with_a_reason_and_done(server):
    proc, url = server
    outs, threads = open_streams(url, 16)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=30)
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err and "drained" in err
    for out in outs:
        if out[0] in (429, 503):  # past the queue, or after the drain began: refused, with Retry-After
            assert "retry" in out[1]
            continue
        assert out[0] == 200 and out[-1] == "[DONE]", out[-3:]
        last = json.loads(out[-2])
        finished = "error" in last or last["choices"][0]["finish_reason"] in ("length", "stop")
        assert finished, last
        assert "error" not in last or "shutting down" in last["error"]["message"]


def test_a_second_sigterm_cuts_the_grace_short_and_still_ends_each_stream(long_tiny, tmp_path):
    """--grace 60, two signals: every stream ends within seconds with its reason and [DONE], exit 0."""
    proc, url = start_server(adapters(long_tiny, tmp_path), "--slots", "4", "--context", "2048", "--grace", "60")
    outs, threads = open_streams(url, 6)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0 and time.monotonic() - t < 20  # not the 60 s of grace
    for thread in threads:
        thread.join(timeout=30)
    assert "Traceback" not in proc.stderr.read()
    assert all(out[-1] == "[DONE]" and "shutting down" in out[-2] for out in outs), [o[-2:] for o in outs]


def test_a_body_that_never_arrives_neither_holds_the_server_nor_its_drain(server):
    """Half a body, then silence: SIGTERM still ends the server within its grace (1 s), exit 0."""
    proc, url = server
    s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\": ")
    time.sleep(0.5)
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    huge = httpx.post(f"{url}/v1/completions", json={"model": "a1", "prompt": "x" * 900_000}, timeout=60)
    assert huge.status_code in (400, 413) and huge.json()["error"]["message"]  # refused before tokenizing
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0 and time.monotonic() - t < 10
    assert "Traceback" not in proc.stderr.read()
    s.close()


def never_reading_client(url, body) -> socket.socket:
    """A raw connection that sends one streamed request and never reads (a tiny receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    host, port = url.rsplit(":", 1)
    s.connect(("127.0.0.1", int(port)))
    data = json.dumps({**body, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def test_clients_that_never_read_and_a_full_queue_do_not_keep_a_short_request_out(server):
    """40 clients ask for 2,000-token streams and never read: 4 take the slots, 8 wait, the rest get 429;
    each that fills its socket's buffers is cut after --stall-timeout (2 s) (on a fast machine the tiny
    model may finish first: its answer waits in the buffers), so a short request (retrying on 429, as
    clients do) is served. The cut itself, deterministically: test_a_client_that_takes_nothing_is_cut_and_one_that_reads_is_not."""
    proc, url = server
    body = {"model": "a1", "prompt": "the quick brown fox", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True}
    sockets = [never_reading_client(url, body) for _ in range(40)]
    for _ in range(100):  # bounded: until the slots are taken
        if httpx.get(f"{url}/health", timeout=5).json()["free"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(f"{url}/health", timeout=5).json()["waiting"] <= 8  # a queue of 8: the rest got 429
    for _ in range(240):  # a short request, retried on 429 as a client should (bounded: 2 minutes)
        r = httpx.post(f"{url}/v1/completions", json={"model": "a1", "prompt": "x", "max_tokens": 3}, timeout=120)
        if r.status_code != 429:
            break
        assert r.headers.get("retry-after")
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    for s in sockets:
        s.close()


@pytest.mark.parametrize("flags, words", [
    (["--api-key", ""], "--api-key must be a non-empty key"),
    (["--api-key", "kéy"], "printable ASCII"),
    (["--port", "70000"], "is not a port"),
])
def test_start_up_refuses_a_bad_key_and_port_in_one_line(tiny, tmp_path, flags, words):
    files = adapters(tiny, tmp_path)
    r = subprocess.run([sys.executable, "serve.py", "--adapter", str(files[0]), *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_port_in_use_is_refused_before_serving_is_said(tiny, tmp_path):
    files = adapters(tiny, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "serve.py", "--adapter", str(files[0]), "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "serving" not in r.stderr, r.stderr
