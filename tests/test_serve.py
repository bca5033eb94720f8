"""serve.py as a real server process on a free loopback port, asked with the official `openai`
client: greedy answers equal generate.py's for the same Aligner and prompt, token for token (an
Alpaca-trained and a chat-template Aligner, completions and chat); streamed text equals the whole
text; 16 concurrent requests over four Aligners (two token counts) and the base, arriving at
different times, each get the answer they get alone; a client that leaves mid-stream frees its slot;
bad requests get the right 4xx in OpenAI's error shape and the server goes on; SIGTERM stops it.

Run: .venv/bin/python -m pytest -q tests/test_serve.py"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT
from test_model import nonzero_aligner

from support.adapter_file import save_aligner
from support.checkpoint import load_model

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
KEY = "test-key-123"
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
PROMPTS = ["Below is an instruction", "the quick brown fox", "Write a response.", "### Input: the lazy dog"]
ADAPTERS = {"a1": (1, 3, "alpaca"), "a2": (1, 5, "alpaca"), "a3": (2, 7, "raw"), "a4": (1, 9, "chat")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """(process, port, adapter files): four Aligners with non-zero gates on the tiny model, served with
    4 slots, so 16 requests queue, share batches and switch token counts."""
    _, path = tiny
    folder = tmp_path_factory.mktemp("serve")
    args = load_model(path).args
    files = {}
    for name, (n, seed, template) in ADAPTERS.items():
        a = nonzero_aligner(args, n, seed=seed)
        a.meta.update(base=str(path.resolve()), template=template)
        a.meta.update({"chat_template": TEMPLATE} if template == "chat" else {})
        files[name] = folder / f"{name}.pt"
        save_aligner(a, files[name])
    port = free_port()
    cmd = [sys.executable, "serve.py", *[x for f in files.values() for x in ("--adapter", str(f))], "--port", str(port),
           "--slots", "4", "--context", "256", "--api-key", KEY, "--body-limit", "20000",
           "--dtype", "float32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    for _ in range(120):  # bounded: at most a minute to start
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
    yield proc, port, files
    if proc.poll() is None:
        proc.kill()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


def generate_answers(files, names, template_flags, tmp_path) -> dict:
    """{(adapter name, prompt): answer} from generate.py --data, greedy, 12 new tokens."""
    data, out = tmp_path / "p.json", tmp_path / "a.jsonl"
    data.write_text(json.dumps([{"instruction": p} for p in PROMPTS]))
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "generate.py", *[x for n in names for x in ("--adapter", str(files[n]))], "--data",
           str(data), "--out", str(out), "--temperature", "0", "--max-new-tokens", "12", "--dtype", "float32",
           *template_flags]  # the server's dtype: bfloat16 is generate.py's default where the CPU has it
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {(os.path.basename(row["adapter"])[:-3], row["instruction"]): row["answer"] for row in rows}


def test_models_lists_the_base_and_each_aligner(client):
    assert [m.id for m in client.models.list().data] == ["base", "a1", "a2", "a3", "a4"]


def test_greedy_answers_equal_generate_and_streams_equal_whole(client, server, tmp_path):
    files = server[2]
    templated = generate_answers(files, ["a1", "a4"], [], tmp_path)  # each adapter's own template
    raw = generate_answers(files, ["a1", "a3"], ["--template", "raw"], tmp_path)
    for (name, prompt), expected in templated.items():
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=12)
        assert r.choices[0].message.content == expected
        assert r.usage.completion_tokens <= 12 and r.usage.total_tokens > r.usage.completion_tokens
        parts = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=12, stream=True)
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == expected
    for (name, prompt), expected in raw.items():
        r = client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=12)
        assert r.choices[0].text == expected
        parts = client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=12, stream=True)
        assert "".join(p.choices[0].text for p in parts) == expected


def test_sixteen_concurrent_requests_each_get_their_answer_alone(client):
    models = ["a1", "a2", "a3", "a4", "base"]
    jobs = [(models[i % 5], PROMPTS[i % 4] + f" {i}", 6 + i % 7) for i in range(16)]

    def ask(job, delay=0.0):
        time.sleep(delay)
        name, prompt, n = job
        return client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=n).choices[0].text

    alone = [ask(job) for job in jobs]
    with ThreadPoolExecutor(16) as pool:  # arriving 0 to 0.75 s apart, while others decode
        together = list(pool.map(lambda i: ask(jobs[i], 0.05 * i), range(16)))
    assert together == alone


def test_sampling_with_a_seed_is_repeatable_and_stop_strings_end_answers(client):
    kwargs = dict(model="a2", prompt="the quick brown fox", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second
    whole = client.completions.create(model="a1", prompt="the lazy dog", temperature=0, max_tokens=20)
    text = whole.choices[0].text
    stop = text[3:6]
    cut = client.completions.create(model="a1", prompt="the lazy dog", temperature=0, max_tokens=20, stop=stop)
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def health(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_a_client_that_leaves_mid_stream_frees_its_slot(client, server):
    import httpx

    port = server[1]
    body = {"model": "a1", "prompt": "the quick brown fox", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert health(port)["free"] == 3  # this request holds one of the 4 slots
    for _ in range(100):  # bounded: the engine frees it within a few steps
        if health(port)["free"] == 4:
            break
        time.sleep(0.1)
    assert health(port) == {"status": "ok", "slots": 4, "free": 4, "waiting": 0}
    assert client.completions.create(model="a1", prompt="x", max_tokens=3, temperature=0).usage.completion_tokens


def test_n_answers_a_prompt_list_and_logprobs_stream_and_chat(client):
    """n answers per prompt, prompt-major; greedy copies agree; streamed logprobs equal the whole's;
    chat's logprobs name each token of the answer with its top alternatives; GET /v1/models/{id}."""
    r = client.completions.create(model="a1", prompt=["the lazy dog", "Write a"], n=3, max_tokens=6, temperature=0,
                                  logprobs=1)
    assert [c.index for c in r.choices] == list(range(6))
    assert len({c.text for c in r.choices[:3]}) == 1 and r.choices[3].text == r.choices[5].text
    alone = client.completions.create(model="a1", prompt="Write a", max_tokens=6, temperature=0)
    assert r.choices[4].text == alone.choices[0].text
    sampled = client.completions.create(model="a1", prompt="the lazy dog", n=4, max_tokens=8, temperature=1.0, seed=3)
    assert len({c.text for c in sampled.choices}) > 1
    parts = list(client.completions.create(model="a1", prompt="the lazy dog", max_tokens=6, temperature=0, logprobs=1,
                                           echo=True, stream=True))
    whole = client.completions.create(model="a1", prompt="the lazy dog", max_tokens=6, temperature=0, logprobs=1,
                                      echo=True)
    streamed = [x for p in parts if p.choices[0].logprobs for x in p.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    chat = client.chat.completions.create(model="a4", messages=[{"role": "user", "content": "the fox"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content).startswith(chat.choices[0].message.content)
    assert all(len(t.top_logprobs) == 3 and t.logprob == t.top_logprobs[0].logprob for t in content)
    assert client.models.retrieve("a2").id == "a2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("body, status, words", [
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "../a1.pt", "prompt": "x"}, 404, "does not exist"),
    ("{not json", 400, "not valid JSON"),
    ({"model": "a1", "prompt": "x", "max_tokens": -3}, 400, "'max_tokens' must be"),
    ({"model": "a1", "prompt": "x", "max_tokens": 10**9}, 400, "'max_tokens' must be"),
    ({"model": "a1", "prompt": "the lazy dog " * 200}, 400, "this server's context is 256"),
    ({"model": "a1", "prompt": "x", "n": 17}, 400, "'n' must be a whole number from 1 to 16"),
    ({"model": "a1", "prompt": "x", "logprobs": 21}, 400, "'logprobs' must be a whole number from 0 to 20"),
    ({"model": "a1", "prompt": "x", "max_tokens": 0}, 400, "send it with echo true"),
    ({"model": "a1", "prompt": [5, 320]}, 400, "token ids must be from 0 to 319"),
    ({"model": "a1", "prompt": [[5], []]}, 400, "none empty"),
    ({"model": "a1", "prompt": ["x"] * 40, "n": 2}, 400, "more than this server's queue"),
    ({"model": "a1", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "needs 'logprobs'"),
    ({"model": "a1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "at least 1"),
    ({"model": "a1", "prompt": "x", "suffix": "y"}, 400, "'suffix' is not supported"),
    ({"model": "a1", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "'tools'"),
    ({"model": "a1", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "send one user message"),
    ({"model": "a4", "messages": [{"role": "wizard", "content": "x"}]}, 400, "'messages[0].role' must be one of"),
    ({"model": "a1", "prompt": "x", "temperature": "hot"}, 400, "'temperature' must be"),
    ({"model": "a1", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop' must be"),
    ({"model": "a1", "prompt": "x" * 30000}, 413, "larger than this server's limit"),
    ([1, 2], 400, "JSON object"),
    ({"model": "a1", "prompt": "\ud800 lone surrogate"}, 400, "valid text"),  # cases of our own, past the issue's
    ({"model": "a1", "prompt": "x", "temperature": float("nan")}, 400, "'temperature' must be"),
    ({"model": "a1", "prompt": "x", "stream_options": "yes"}, 400, "'stream_options' must be an object"),
    ({"model": "a1", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     400, "'response_format.type' must be text"),
    ({"model": "a1", "prompt": "x", "response_format": {"type": "json_object"}}, 400,
     "'response_format.type' must be text"),
    ({"model": "a1", "prompt": "x", "max_tokens": 2.5}, 400, "'max_tokens' must be a whole number"),
    ({"model": "a1", "prompt": "x", "n": True}, 400, "'n' must be a whole number"),
    ({"model": "a1", "prompt": "x", "stop": ["ok", "\udc00"]}, 400, "'stop' must be"),
    ({"model": "a4", "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}, 400,
     "'messages[0].content' must be"),
    ({"model": "a1", "prompt": "x", "temperature": 1e-300}, 400, "0 in float32"),
    ({"model": "a1", "prompt": "x", "seed": True}, 400, "'seed' must be a whole number"),
    ({"model": 7, "prompt": "x"}, 400, "'model' must be"),
    ({"model": "a1", "prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"model": "a4", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text parts"),
    ({"model": "a1", "prompt": "[" * 100000}, 413, "larger than"),
])
def test_bad_requests_get_a_4xx_in_openais_shape_and_the_server_goes_on(client, server, body, status, words):
    import httpx

    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"http://127.0.0.1:{server[1]}{path}", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and set(error) >= {"message", "type", "code"}
    assert client.completions.create(model="base", prompt="x", max_tokens=2, temperature=0).choices


def test_a_compressed_body_is_refused_not_misread(server, client):
    import httpx

    r = httpx.post(f"http://127.0.0.1:{server[1]}/v1/completions", content=json.dumps({"model": "a1", "prompt": "x"}),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Encoding": "gzip"}, timeout=30)
    assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]["message"]
    assert client.completions.create(model="base", prompt="x", max_tokens=2, temperature=0).choices


def test_other_methods_and_paths_answer_in_the_error_shape(server):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path, status in (("GET", "/v1/completions", 405), ("POST", "/v1/engines", 404)):
        r = httpx.request(method, f"http://127.0.0.1:{server[1]}{path}", headers=headers, json={})
        assert r.status_code == status and "message" in r.json()["error"]
    deep = "[" * 5000 + "]" * 5000  # nested past Python's recursion limit, within the body limit
    r = httpx.post(f"http://127.0.0.1:{server[1]}/v1/completions", headers=headers, content=deep)
    assert r.status_code == 400


def test_a_missing_or_wrong_key_is_401(server, client):
    import httpx

    other = openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        other.completions.create(model="a1", prompt="x", max_tokens=2)
    assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    r = httpx.post(f"http://127.0.0.1:{server[1]}/v1/completions", json={"model": "a1", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.models.list().data


def test_sigterm_stops_the_server_cleanly(server):
    proc = server[0]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "Traceback" not in proc.stderr.read()
