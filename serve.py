"""One frozen base, many Aligners, served over the OpenAI API with continuous batching.

    pip install -r requirements-serve.txt          # FastAPI and uvicorn: only this command needs them
    python serve.py --adapter a.pt --adapter b.pt   # or --adapters DIR: every .pt file in it
    curl 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "a", "messages": [{"role": "user", "content": "Name a colour."}]}'

GET /v1/models lists "base" and each Aligner by its file's name; POST /v1/completions (raw text)
and /v1/chat/completions (messages in the Aligner's own template) answer with `model` choosing the
Aligner per request. One decoding loop (Engine) holds --slots rows of KV cache: a request is
prefilled and joins the running batch at the next step, each row at its own position and with its
own Aligner (aligner.AlignerBatch; the base is row index 0), and leaves at EOS, max_tokens, a stop
string or a disconnect, freeing its slot. Aligners of different token counts cannot share a
batch: requests are admitted first come, first served, and one of another token count waits for
the running batch to drain (nothing behind it is admitted meanwhile), so no count starves.
Not part of the primer. Read next: docs/serving.md (the API, the limits, the benchmark).
"""
import asyncio
import hmac
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aligner import AlignerBatch
from data import format_prompt
from generate import Column, Sampling, column, sample
from support.adapter_file import load_aligner, one_base
from support.chat import ROLES
from support.checkpoint import load_base
from support.convert import model_dir
from support.errors import UserError, run_main
from support.flags import Runtime, check_flags, count, flag, parse_flags, path_text, positive_int
from support.inputs import valid_text

UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "suffix",
               "logit_bias", "echo", "best_of")


@dataclass
class ServeConfig:
    """What to serve, where, and the limits of each request (--help lists these)."""
    adapter: list = flag(None, "an Aligner file to serve, named by its file name (repeatable)", path_text,
                         action="append")
    adapters: str = flag(None, "a directory: serve every .pt file in it", path_text)
    model: str = flag(None, "converted base model directory (default: the adapters' own base)", path_text)
    host: str = flag("127.0.0.1", "address to listen on; anything but loopback should come with --api-key")
    port: int = flag(8000, "port to listen on", count)
    api_key: str = flag(None, "a Bearer token every request must carry (recommended off loopback)")
    slots: int = flag(8, "rows decoded together: requests beyond these wait", positive_int)
    context: int = flag(1024, "KV cache length per row: prompt + answer tokens at most (capped by the model)",
                        positive_int)
    max_tokens: int = flag(256, "answer length when a request names none", positive_int)
    body_limit: int = flag(1_000_000, "largest request body in bytes", positive_int)

    def __post_init__(self):
        check_flags(self)
        if not self.adapter and not self.adapters:
            raise UserError("name the Aligners to serve: --adapter FILE (repeatable) or --adapters DIR")


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "code": code,
                                                    "param": None}}


@dataclass
class Request:
    """One answer being made: its prompt ids, its limits, and where its text goes."""
    ids: list
    served: Column  # the name asked for: its Aligner (or None), template and end-of-answer token
    sampling: Sampling
    max_tokens: int
    stop: list
    events: object  # put(kind, value), called from the engine's thread
    tokens: list = field(default_factory=list)
    sent: int = 0  # characters of the answer already sent
    slot: int = -1
    pos: int = 0  # the cache column the next token goes to
    cancelled: bool = False
    ignore_eos: bool = False  # vLLM's extension, for benchmarks: answers of a fixed length
    rng: object = None  # the random state of its sampling, kept between steps

    @property
    def group(self):
        """The token count of its Aligner: requests of one count share a batch (None: the base)."""
        return self.served.aligner.n_tokens if self.served.aligner is not None else None


class Engine:
    """The decoding loop: --slots rows of KV cache over one model, requests joining and leaving
    between steps. Runs in its own thread; submit() and cancel() may be called from any thread."""

    def __init__(self, model, tok, served: dict, slots: int, context: int):
        self.model, self.tok, self.context = model, tok, context
        self.device = model.output.weight.device
        aligned = [(name, s.aligner) for name, s in served.items() if s.aligner is not None]
        self.batchers, self.row = {}, {name: 0 for name in served}  # row 0 of any batcher: the base
        for n in sorted({a.n_tokens for _, a in aligned}) or [1]:
            members = [(name, a) for name, a in aligned if a.n_tokens == n]
            self.batchers[n] = AlignerBatch([a for _, a in members], model.args).to(self.device)
            self.row.update((name, j) for j, (name, _) in enumerate(members, 1))
        self.group = min(self.batchers)  # the token count of the running batch
        self.slots, self.waiting, self.spare, self.rows = [None] * slots, [], None, 0
        self.wakeup, self.stopping, self.failure = threading.Condition(), threading.Event(), None
        self.cache = model.new_cache(slots, context, self.batchers[self.group])  # every slot's buffers, once

    def submit(self, r: Request):
        with self.wakeup:
            self.waiting.append(r)
            self.wakeup.notify()

    def cancel(self, r: Request):
        r.cancelled = True
        with self.wakeup:
            self.wakeup.notify()

    def free_slots(self) -> int:
        return self.slots.count(None)

    def run(self):
        """Admit, prefill, step, until stopped; a failure ends every request with a server error."""
        try:
            while not self.stopping.is_set():
                new = self.admit()
                if new:
                    self.prefill(new)
                if any(self.slots):
                    self.step()
        except Exception as e:  # a bug or an exhausted device: tell every client, do not hang them
            self.failure = f"the server's decoding loop failed ({type(e).__name__}: {e}); restart it"
            for r in self.waiting + [r for r in self.slots if r]:
                r.events("error", self.failure)
            raise

    def admit(self) -> list:
        """Waiting requests moved into free slots, first come first served: one whose Aligner has
        another token count than the running batch waits for it to drain, and blocks those behind."""
        with self.wakeup:
            while not self.stopping.is_set() and not self.waiting and not any(self.slots):
                self.wakeup.wait(0.5)
            for i, r in enumerate(self.slots):
                if r is not None and r.cancelled:
                    self.slots[i] = None
            self.waiting = [r for r in self.waiting if not r.cancelled]
            new = []
            while self.waiting and None in self.slots:
                r = self.waiting[0]
                if r.group not in (None, self.group) and (any(self.slots) or new):
                    break
                self.group = self.group if r.group is None else r.group
                r.slot = self.slots.index(None)
                self.slots[r.slot] = self.waiting.pop(0)
                new.append(r)
            return new

    @torch.no_grad()
    def prefill(self, new: list):
        """The new requests' prompts in one pass, left-padded, through a cache of their own whose
        keys/values are then copied to the start of each one's slot; then their first tokens."""
        model, batcher = self.model, self.batchers[self.group]
        n = max(len(r.ids) for r in new)
        pad = torch.tensor([n - len(r.ids) for r in new])  # (P,) left padding of each new row
        ids = torch.tensor([[0] * (n - len(r.ids)) + r.ids for r in new], device=self.device)  # (P, n)
        batcher.use([self.row[r.served.name] for r in new])
        self.spare = model.new_cache(len(new), n, batcher, pad, reuse=self.spare)  # the prefill's own buffers
        at = torch.arange(n, device=self.device)  # (n,)
        logits = model(ids, batcher, at, cache=self.spare)[:, -1]  # (P, vocab)
        self.rows = 0  # the running batch's cache is made for its rows again at the next step
        for j, r in enumerate(new):
            for big, small in zip(self.cache.layers, self.spare.layers):
                big.k[r.slot, : len(r.ids)] = small.k[j, n - len(r.ids): n]  # (n_r, K, E)
                big.v[r.slot, : len(r.ids)] = small.v[j, n - len(r.ids): n]  # (n_r, K, E)
            r.pos = len(r.ids)
            self.emit(r, self.pick(r, logits[j]))

    def attach(self, rows: int):
        """The running batch's caches for the first `rows` slots, each with its request's Aligner."""
        batcher = self.batchers[self.group]
        batcher.use([self.row[r.served.name] if r else 0 for r in self.slots[:rows]])
        self.cache = self.model.new_cache(rows, self.context, batcher, reuse=self.cache)  # the same buffers
        self.rows = rows

    @torch.no_grad()
    def step(self):
        """One token for every slot up to the last busy one (new requests take the lowest free slot,
        so few requests make a small batch), each row at its own position."""
        rows = 1 + max(i for i, r in enumerate(self.slots) if r)
        if rows != self.rows:
            self.attach(rows)
        slots = self.slots[:rows]
        ids = torch.tensor([[r.tokens[-1] if r else 0] for r in slots], device=self.device)  # (b, 1)
        pos = torch.tensor([[r.pos if r else 0] for r in slots], device=self.device)  # (b, 1)
        logits = self.model(ids, self.batchers[self.group], pos, cache=self.cache)[:, -1]  # (b, vocab)
        active = [r for r in slots if r]
        for r in active:
            r.pos += 1
            self.emit(r, self.pick(r, logits[r.slot]))

    def pick(self, r: Request, logits) -> int:
        """The request's next token from its logits (vocab,): greedy, or sampled with its own seed."""
        if r.sampling.temperature <= 0:
            return int(logits.argmax())
        with torch.random.fork_rng(devices=[]):
            if r.rng is None:
                torch.manual_seed(r.sampling.seed)
            else:
                torch.set_rng_state(r.rng)
            token = int(sample(logits[None].cpu(), r.sampling)[0, 0])
            r.rng = torch.get_rng_state()
        return token

    def emit(self, r: Request, token: int):
        """The token's new text to the client; the request ends at its EOS, a stop string, its
        max_tokens or the end of its slot's cache."""
        if r.cancelled:
            return self.finish(r, None)
        if token == r.served.eos_id and not r.ignore_eos:
            return self.finish(r, "stop")
        r.tokens.append(token)
        text = self.tok.decode(r.tokens)
        cut = min((text.find(s) for s in r.stop if s in text), default=-1)
        if cut >= 0:
            return self.finish(r, "stop", text[:cut])
        if len(r.tokens) >= r.max_tokens or r.pos + 1 >= self.context:
            return self.finish(r, "length", text)
        hold = max((len(s) - 1 for s in r.stop), default=0)  # a stop string may be starting
        ready = len(text) - hold if not text.endswith("\ufffd") else len(text.rstrip("\ufffd")) - hold
        if ready > r.sent:
            r.events("text", text[r.sent: ready])
            r.sent = ready

    def finish(self, r: Request, reason, text=None):
        self.slots[r.slot] = None
        if reason is not None:
            text = self.tok.decode(r.tokens) if text is None else text
            if len(text) > r.sent:
                r.events("text", text[r.sent:])
            r.events("done", (reason, len(r.ids), len(r.tokens)))


# ---- the requests: checked fields, prompts in the served template ---------------------------------
def number(body: dict, key: str, default, low, high, kind=(int, float)):
    """body[key] (or the default) when it is a number in [low, high], else a 400."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        whole = "whole " if kind is int else ""
        given = json.dumps(value)[:40]
        raise ApiError(400, f"'{key}' must be a {whole}number from {low} to {high}, not {given}")
    return value


def refuse_unsupported(body: dict):
    """Fields this server does not do are refused by name, not ignored."""
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}, "") and not (key == "best_of" and body[key] == 1):
            raise ApiError(400, f"'{key}' is not supported by this server")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1: this server makes one answer per request")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key, 0) not in (0, None):
            raise ApiError(400, f"'{key}' is not supported by this server (only 0)")
    for key in ("response_format", "stream_options"):
        if not isinstance(body.get(key) or {}, dict):
            raise ApiError(400, f"'{key}' must be an object")
    if (body.get("response_format") or {}).get("type", "text") != "text":
        raise ApiError(400, "'response_format' must be text: this server writes no JSON modes")


def stop_strings(body: dict) -> list:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings")
    return stop


def message_text(m, i: int) -> dict:
    """A chat message as {"role", "content"}; content may be a list of text parts."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(400, f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str) or not valid_text(content):
        raise ApiError(400, f"messages[{i}].content must be a string of valid text (or a list of text parts)")
    return {"role": m["role"], "content": content}


def prompt_of(body: dict, served: Column, tok, chat: bool) -> list:
    """The prompt's token ids: raw text for completions; for chat, the messages in the served
    template (the chat template the Aligner was trained with, or one user turn in Alpaca's)."""
    if not chat:
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str) or not prompt or not valid_text(prompt):
            raise ApiError(400, "'prompt' must be a non-empty string of valid text")
        return tok.encode(prompt)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list")
    messages = [message_text(m, i) for i, m in enumerate(messages)]
    if served.chat is not None:
        try:
            return served.chat.prompt_ids(messages)
        except UserError as e:
            raise ApiError(400, str(e)) from None
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise ApiError(400, f"this model was trained with the {served.template} template, which has no "
                            f"turns: send one user message")
    return tok.encode(format_prompt(messages[0]["content"], template=served.template))


def make_request(body, served: dict, tok, context: int, default_tokens: int, chat: bool, events):
    """A Request from a parsed JSON body, every field checked; a 4xx ApiError otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or name not in served:
        raise ApiError(404, f"the model {json.dumps(name)[:60]} does not exist: GET /v1/models lists them",
                       code="model_not_found")
    refuse_unsupported(body)
    ids = prompt_of(body, served[name], tok, chat)
    room = context - len(ids) - 1
    if room < 1:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {context}",
                       code="context_length_exceeded")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, key, min(default_tokens, room), 1, room, int)
    sampling = Sampling(max_new_tokens=max_tokens, temperature=number(body, "temperature", 1.0, 0, 2),
                        top_k=0, top_p=number(body, "top_p", 1.0, 1e-9, 1),
                        seed=number(body, "seed", 0, 0, 2**31 - 1, int))
    for key in ("stream", "ignore_eos"):
        if not isinstance(body.get(key, False), bool):
            raise ApiError(400, f"'{key}' must be true or false")
    return Request(ids, served[name], sampling, max_tokens, stop_strings(body), events,
                   ignore_eos=body.get("ignore_eos", False))


# ---- the web side: FastAPI routes, streaming, keys, limits ----------------------------------------
def error_response(e: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body, status_code=e.status)


async def read_body(request, limit: int):
    """The JSON body, at most `limit` bytes (counted as it arrives: a false Content-Length does not
    get past), or a 4xx ApiError."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None


def chunk(kind: str, rid: str, name: str, text=None, reason=None, usage=None) -> dict:
    """One completion object (or a streamed chunk of one) in OpenAI's shape."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    elif kind == "chat.chunk":
        choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
    obj = {"chat": "chat.completion", "chat.chunk": "chat.completion.chunk"}.get(kind, "text_completion")
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice]}
    return {**out, "usage": usage} if usage is not None else out


def usage_of(done) -> dict:
    _, prompt, completion = done
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def answer(engine: Engine, r: Request, events: asyncio.Queue, kind: str, name: str, request):
    """A whole answer (not streamed): wait for the engine, cancelling when the client leaves."""
    text = []
    while True:
        try:
            event, value = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                engine.cancel(r)
                return None
            continue
        if event == "error":
            raise ApiError(500, value, kind="server_error")
        if event == "done":
            return chunk(kind, f"cmpl-{uuid.uuid4().hex}", name, "".join(text), value[0], usage_of(value))
        text.append(value)


async def stream(engine: Engine, r: Request, events: asyncio.Queue, kind: str, name: str, usage: bool):
    """Server-sent events, as the OpenAI client reads them; a client that leaves cancels the request
    (Starlette stops this generator, and `finally` frees the slot)."""
    rid, kind = f"cmpl-{uuid.uuid4().hex}", f"{kind}.chunk" if kind == "chat" else kind
    try:
        if kind == "chat.chunk":
            first = chunk(kind, rid, name)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield f"data: {json.dumps(first)}\n\n"
        while True:
            event, value = await events.get()
            if event == "error":
                yield f"data: {json.dumps(ApiError(500, value, 'server_error').body)}\n\n"
                return
            if event == "done":
                yield f"data: {json.dumps(chunk(kind, rid, name, None, value[0]))}\n\n"
                if usage:
                    last = {**chunk(kind, rid, name), "choices": [], "usage": usage_of(value)}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield f"data: {json.dumps(chunk(kind, rid, name, value))}\n\n"
    finally:
        engine.cancel(r)  # nothing if it has finished; frees the slot if the client left


def make_app(engine: Engine, served: dict, tok, cfg: ServeConfig):
    """The FastAPI application: /v1/models, /v1/completions, /v1/chat/completions."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="aligner", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, lambda _, e: error_response(e))
    app.add_exception_handler(HTTPException,
                              lambda _, e: error_response(ApiError(e.status_code, str(e.detail))))
    app.add_exception_handler(RequestValidationError,
                              lambda _, e: error_response(ApiError(400, str(e)[:200])))
    app.add_exception_handler(Exception, lambda _, e: error_response(  # a bug: said, and the server goes on
        ApiError(500, f"the server failed on this request: {type(e).__name__}", kind="server_error")))

    @app.middleware("http")
    async def check_key(request, call_next):
        given = request.headers.get("authorization", "")
        if cfg.api_key and not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            return error_response(ApiError(401, "a missing or wrong API key: send Authorization: Bearer KEY",
                                           code="invalid_api_key"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        listed = [{"id": name, "object": "model", "created": 0, "owned_by": "aligner"} for name in served]
        return {"object": "list", "data": listed}

    async def complete(request: HttpRequest, kind: str):
        if engine.failure:
            raise ApiError(503, engine.failure, kind="server_error")
        body = await read_body(request, cfg.body_limit)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def put(event: str, value):  # called from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, (event, value))

        r = make_request(body, served, tok, engine.context, cfg.max_tokens, kind == "chat", put)
        engine.submit(r)
        name = body["model"]
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events_out = stream(engine, r, events, kind, name, usage)
            return StreamingResponse(events_out, media_type="text/event-stream")
        return await answer(engine, r, events, kind, name, request)

    @app.get("/health")
    async def health():  # not OpenAI's: how full the server is
        return {"slots": len(engine.slots), "free": engine.free_slots(), "waiting": len(engine.waiting)}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(request, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await complete(request, "chat")

    return app


def load_served(cfg: ServeConfig, runtime: Runtime):
    """(model, tokenizer, {name: Column}): the base once, each Aligner named by its file's name."""
    files = [Path(p) for p in cfg.adapter or []]
    if cfg.adapters:
        if not Path(cfg.adapters).is_dir():
            raise UserError(f"--adapters {cfg.adapters} is not a directory")
        files += sorted(Path(cfg.adapters).glob("*.pt"))
    if not files:
        raise UserError(f"no .pt adapter files in {cfg.adapters}")
    names = [f.stem for f in files]
    for name in names:
        if names.count(name) > 1 or name == "base":
            raise UserError(f"two adapters would be served as {name!r} (or one as 'base', the base model's "
                            f"name): rename a file")
    adapters = [(str(f), load_aligner(f)) for f in files]
    path = model_dir(one_base(adapters, cfg.model))
    device = runtime.pick_device()
    model, tok = load_base(path, runtime, device)
    served = {"base": column("base", None, "alpaca", tok, path)}
    for name, (where, a) in zip(names, adapters):
        a.check_fits(model.args, where)
        served[name] = column(name, a.to(device), a.meta.get("template", "alpaca"), tok, path)
    return model, tok, served


def serve(cfg: ServeConfig, runtime: Runtime):
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve.py needs FastAPI and uvicorn: pip install -r requirements-serve.txt") from None
    if runtime.compile:
        raise UserError("serve.py does not compile its decoding step yet (rows join and leave every step): "
                        "leave out --compile")
    model, tok, served = load_served(cfg, runtime)
    engine = Engine(model, tok, served, cfg.slots, min(cfg.context, model.args.max_seq_len))
    thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    thread.start()
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: listening on {cfg.host} with no --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    print(f"serving {', '.join(served)} on http://{cfg.host}:{cfg.port}/v1 ({cfg.slots} slots of "
          f"{engine.context} tokens); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        uvicorn.run(make_app(engine, served, tok, cfg), host=cfg.host, port=cfg.port, log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        engine.stopping.set()
        thread.join(timeout=10)


def main(argv=None):
    run_main(lambda: serve(*parse_flags(argv, __doc__, ServeConfig, Runtime)))


if __name__ == "__main__":
    main()
