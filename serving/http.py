"""The HTTP side: FastAPI routes in OpenAI's shapes, streaming, the API key, and a uvicorn server that
drains on SIGTERM. The event loop only waits: reading a body, parsing, rendering and tokenizing run in
worker threads; the engine runs in its own.

    app = make_app(engine, served, tok, settings)      # settings: serve.py's ServeConfig
    Server(app, engine, settings).run(sock)             # SIGTERM: drain, then exit

One body may ask for several answers (a list of prompts, `n`): each is a Request of the engine, and
their events meet in one queue, tagged with the choice's index, in one response or one stream.

SIGTERM (or Ctrl-C) stops admitting (503 with Retry-After), lets running answers finish for --grace
seconds, then ends each open one with a final error event that says why and `[DONE]`; a second signal
ends at once. Read next: docs/serving.md (the API, the limits, the benchmark).
"""
import asyncio
import hmac
import json
import time
import uuid

import torch

from data import format_prompt
from generate import Sampling
from serving.engine import Engine, Request
from serving.schema import ApiError, parse
from support.errors import UserError


def error_response(e: ApiError):
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return JSONResponse(e.body, status_code=e.status, headers=headers)


def fits(text: str, limits) -> str:
    """The text, if it can fit the context at all (checked before tokenizing it), else a 400."""
    if limits.prompt_chars and len(text) > limits.prompt_chars:
        raise ApiError(400, f"the prompt is {len(text):,} characters, more than any {limits.context} tokens "
                            f"hold: this server's context is {limits.context}",
                       code="context_length_exceeded")
    return text


def completion_ids(prompt, tok, limits) -> tuple:
    """(token ids, text) of one completion prompt: a text, or token ids inside the vocabulary."""
    if isinstance(prompt, str):
        return tok.encode(fits(prompt, limits)), prompt
    if not all(0 <= i < tok.vocab_size for i in prompt):
        raise ApiError(400, f"'prompt' token ids must be from 0 to {tok.vocab_size - 1} (this model's "
                            f"vocabulary), not {[i for i in prompt if not 0 <= i < tok.vocab_size][0]}")
    return list(prompt), tok.decode(prompt)


def prompt_ids(body, served, tok, limits) -> list:
    """The chat prompt's token ids: the messages in the served template (the chat template the
    Aligner was trained with, or one user turn in Alpaca's)."""
    messages = [{"role": m.role, "content": fits(m.text(), limits)} for m in body.messages]
    if served.chat is not None:
        try:
            return tok.encode(fits(served.chat.render(messages, True), limits), bos=False)
        except UserError as e:
            raise ApiError(400, str(e)) from None
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise ApiError(400, f"this model was trained with the {served.template} template, which has no "
                            f"turns: send one user message")
    return tok.encode(fits(format_prompt(messages[0]["content"], template=served.template), limits))


def not_found(name) -> ApiError:
    return ApiError(404, f"the model {json.dumps(name)[:60]} does not exist: GET /v1/models lists them",
                    code="model_not_found")


def make_requests(raw: bytes, served: dict, tok, limits, default_tokens: int, chat: bool):
    """(Requests without their event sinks, one per choice: prompt i's answer j is choice i * n + j;
    the parsed body; each choice's prompt as text) from a raw body; a 4xx ApiError
    otherwise. Runs in a worker thread: parsing, rendering and tokenizing never block the event loop."""
    body = parse(raw, chat)
    if body.model not in served:
        raise not_found(body.model)
    if chat:
        prompts, top, echo = [(prompt_ids(body, served[body.model], tok, limits), "")], body.top(), False
    else:
        prompts = [completion_ids(p, tok, limits) for p in body.prompts()]
        top, echo = body.logprobs, body.echo
    if len(prompts) * body.n > limits.queue:
        raise ApiError(400, f"{len(prompts)} prompts x n {body.n} answers is more than this server's queue "
                            f"of {limits.queue}: send fewer in one request")
    requests = []
    for ids, text in prompts:
        for j in range(body.n):
            r = make_request(body, ids, served, limits, default_tokens, chat, seed=body.seed + j)
            r.logprobs, r.prompt_logprobs = top, top if echo else None
            requests.append(r)
    return requests, body, [text for _, text in prompts for _ in range(body.n)]


def make_request(body, ids: list, served: dict, limits, default_tokens: int, chat: bool, seed: int):
    """The Request of one answer to the prompt `ids`, its limits checked against the context."""
    as_computed = torch.tensor(body.temperature, dtype=torch.float32)  # (): the value the sampling divides by
    if body.temperature > 0 and not as_computed > 0:
        raise ApiError(400, f"'temperature' {body.temperature:g} is 0 in float32, the dtype the sampling "
                            f"runs in: send 0 for greedy decoding, or a larger value")
    context, stop = limits.context, body.stop_strings()
    room = context - len(ids) - 1
    if room < 1:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {context}",
                       code="context_length_exceeded")
    asked = (body.max_completion_tokens if chat else None) or body.max_tokens
    if asked is not None and asked > room:
        raise ApiError(400, f"'max_tokens' must be a whole number from 1 to {room} (the room this prompt "
                            f"leaves in the context of {context}), not {asked}")
    max_tokens = min(default_tokens, room) if asked is None else asked
    sampling = Sampling(max_new_tokens=max(1, max_tokens), temperature=body.temperature, top_k=0,
                        top_p=body.top_p, seed=seed)
    return Request(ids, served[body.model], sampling, max_tokens, stop, put=None, ignore_eos=body.ignore_eos)


async def read_body(request, limit: int, seconds: float) -> bytes:
    """The body's bytes, at most `limit` (counted as they arrive: a false Content-Length does not get
    past), plain (no Content-Encoding), within `seconds` (sooner when a drain begins: the server's
    readers are rescheduled to its end), or a 4xx ApiError."""
    from starlette.requests import ClientDisconnect

    readers = request.app.state.readers
    try:
        async with asyncio.timeout(seconds) as deadline:
            readers.add(deadline)
            return await read_bytes(request, limit)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {seconds:g} s") from None
    except ClientDisconnect:
        raise ApiError(400, "the client left before its body arrived") from None
    finally:
        readers.discard(deadline)


async def read_bytes(request, limit: int) -> bytes:
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise ApiError(415, "send the body without Content-Encoding (this server reads plain JSON)")
    if int(request.headers.get("content-length") or 0) > limit:
        raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes")
    return bytes(data)


def piece(tok, token: int) -> str:
    """A token's own text, as OpenAI's and vLLM's logprobs name it (a special token: its spelling)."""
    return tok.decode([token]) or tok.token_text(token)


def legacy_logprobs(tok, entries: list, offset: int) -> dict:
    """Completions' logprobs: each token, its log-probability and a {text: logprob} of the likeliest
    and itself (None for a prompt's first token), character offsets from `offset` on. Two tokens of
    one text share a key: it keeps the larger, so max(top) is always the likeliest token's."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, e in entries:
        text, top = piece(tok, token), None
        if e is not None:
            top = {}
            for key, lp in [(piece(tok, i), lp) for i, lp in e.top] + [(text, e.logprob)]:
                top[key] = max(lp, top.get(key, lp))
        for key, value in zip(out, (text, None if e is None else e.logprob, top, offset)):
            out[key].append(value)
        offset += len(text)
    return out


def chat_logprobs(tok, entries: list) -> dict:
    """Chat's logprobs: {"content": [each token with its log-probability, bytes and top alternatives]}."""
    def one(token, lp):
        text = piece(tok, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**one(t, e.logprob), "top_logprobs": [one(i, lp) for i, lp in e.top]}
                        for t, e in entries]}


class Choice:
    """What the web side gathers of one choice's events: its text, its end, and which of its
    logprobs entries were shown: the prompt's (with echo, once, first), then the answer's."""

    def __init__(self, r: Request, prompt: str, echo: bool):
        self.r, self.echo, self.text, self.done = r, prompt if echo else "", [], None
        self.shown, self.echoed, self.offset = 0, not echo, 0 if echo else len(prompt)
        self.covered = 0  # the answer's entries the next text event covers (the "logprobs" event)

    def logprobs(self, tok, kind: str, upto: int):
        """The logprobs of what a chunk shows: entries not shown yet, the answer's up to `upto`."""
        if self.r.logprobs is None:
            return None
        entries = [] if self.echoed else list(zip(self.r.ids, self.r.prompt_entries or []))
        entries += [(e.token, e) for e in self.r.entries[self.shown: upto]]
        self.echoed, self.shown = True, max(self.shown, upto)
        if kind.startswith("chat"):
            return chat_logprobs(tok, entries)
        out = legacy_logprobs(tok, entries, self.offset)
        self.offset += sum(map(len, out["tokens"]))
        return out

    def chunks(self, kind: str, rid: str, model: str, tok, index: int, event: str, value) -> list:
        """The streamed chunks of one "text" or "done" event; with echo, the prompt's first (once)."""
        out = []
        if self.echo and not self.echoed:
            prompt = choice(kind, index, self.echo, None, self.logprobs(tok, kind, 0))
            out.append(chunk(kind, rid, model, [prompt]))
        text, reason = (value, None) if event == "text" else (None, value[0])
        self.done = value if event == "done" else None
        upto = self.covered if event == "text" else len(self.r.entries)
        answer = choice(kind, index, text, reason, self.logprobs(tok, kind, upto))
        out.append(chunk(kind, rid, model, [answer]))
        return out


def choice(kind: str, index: int, text=None, reason=None, logprobs=None) -> dict:
    """One choice of a completion object (or of a streamed chunk of one) in OpenAI's shape."""
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                "logprobs": logprobs}
    if kind == "chat.chunk":
        return {"index": index, "delta": {} if text is None else {"content": text}, "finish_reason": reason,
                "logprobs": logprobs}
    return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": logprobs}


def chunk(kind: str, rid: str, name: str, choices: list, usage=None) -> dict:
    """A completion object (or a streamed chunk of one) in OpenAI's shape."""
    obj = {"chat": "chat.completion", "chat.chunk": "chat.completion.chunk"}.get(kind, "text_completion")
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": choices}
    return {**out, "usage": usage} if usage is not None else out


def usage_of(choices: list, n: int) -> dict:
    """Tokens of each prompt once (n answers share one), and of every answer."""
    prompt = sum(len(c.r.ids) for c in choices[::n])
    completion = sum(c.done[2] for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def server_error(value) -> ApiError:
    status, message = value
    return ApiError(status, message, kind="server_error", retry_after=5 if status == 503 else None)


async def answer(engine: Engine, choices: list, events: asyncio.Queue, kind: str, body, tok, request):
    """A whole answer (not streamed): wait for the engine, cancelling when the client leaves."""
    try:
        while not all(c.done for c in choices):
            try:
                index, event, value = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            c = choices[index]
            if event != "logprobs":
                c.r.taken()
            if event == "error":
                raise server_error(value)
            c.done = value if event == "done" else None
            c.text += [value] if event == "text" else []
    finally:
        for c in choices:
            engine.cancel(c.r)  # nothing for one that has finished; frees the slots of the others
    out = [choice(kind, i, c.echo + "".join(c.text), c.done[0], c.logprobs(tok, kind, len(c.r.entries)))
           for i, c in enumerate(choices)]
    return chunk(kind, f"cmpl-{uuid.uuid4().hex}", body.model, out, usage_of(choices, body.n))


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def stream(engine: Engine, choices: list, events: asyncio.Queue, kind: str, body, tok, usage: bool):
    """Server-sent events, as the OpenAI client reads them, each chunk naming its choice; every stream
    ends with `[DONE]`, after each choice's finish reason or an error event that says why; a client
    that leaves cancels the requests."""
    rid, kind = f"cmpl-{uuid.uuid4().hex}", f"{kind}.chunk" if kind == "chat" else kind
    try:
        if kind == "chat.chunk":
            first = [{**choice(kind, i), "delta": {"role": "assistant", "content": ""}}
                     for i in range(len(choices))]
            yield sse(chunk(kind, rid, body.model, first))
        while not all(c.done for c in choices):
            index, event, value = await events.get()
            c = choices[index]
            if event == "logprobs":
                c.covered = value
                continue
            c.r.taken()
            if event == "error":
                yield sse(server_error(value).body)
                break
            for part in c.chunks(kind, rid, body.model, tok, index, event, value):
                yield sse(part)
        else:
            if usage:
                yield sse(chunk(kind, rid, body.model, [], usage_of(choices, body.n)))
        yield sse("[DONE]")
    finally:
        for c in choices:
            engine.cancel(c.r)  # nothing if it has finished; frees the slot if the client left


def make_app(engine: Engine, served: dict, tok, settings):
    """The FastAPI application: /v1/models, /v1/completions, /v1/chat/completions, /health."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app = FastAPI(title="aligner", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, lambda _, e: error_response(e))
    app.add_exception_handler(HTTPException,
                              lambda _, e: error_response(ApiError(e.status_code, str(e.detail))))
    app.add_exception_handler(RequestValidationError,
                              lambda _, e: error_response(ApiError(400, str(e)[:200])))
    app.add_exception_handler(Exception, lambda _, e: error_response(  # a bug: said, and the server goes on
        ApiError(500, f"the server failed on this request: {type(e).__name__}", kind="server_error")))
    app.state.arriving, app.state.readers = 0, set()  # requests being read and checked; their deadlines
    expected = f"Bearer {settings.api_key}".encode()

    @app.middleware("http")
    async def check_key(request, call_next):
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        if settings.api_key and not hmac.compare_digest(given, expected):
            return error_response(ApiError(401, "a missing or wrong API key: send Authorization: Bearer KEY",
                                           code="invalid_api_key"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        listed = [{"id": name, "object": "model", "created": 0, "owned_by": "aligner"} for name in served]
        return {"object": "list", "data": listed}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in served:
            raise not_found(name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "aligner"}

    @app.get("/health")
    async def health():  # not OpenAI's: how full the server is, and why it stopped if it did
        return engine.health()

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await complete(engine, served, tok, settings, request, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await complete(engine, served, tok, settings, request, "chat")

    return app


async def complete(engine: Engine, served: dict, tok, settings, request, kind: str):
    """One request: read and check it off the loop, hand it to the engine, answer or stream."""
    from fastapi.responses import StreamingResponse

    if engine.failure or engine.draining:
        raise server_error((503, engine.failure or "the server is shutting down: retry on another"))
    request.app.state.arriving += 1  # read and checked, not yet the engine's: a drain waits for these
    try:
        raw = await read_body(request, settings.body_limit, settings.stall_timeout)
        requests, body, prompts = await asyncio.to_thread(make_requests, raw, served, tok, engine.limits,
                                                          settings.max_tokens, kind == "chat")
    finally:
        request.app.state.arriving -= 1
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def sink(index: int):
        def put(event: str, value):  # called from the engine's thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, (index, event, value))
        return put

    choices = [Choice(r, text, kind != "chat" and body.echo) for r, text in zip(requests, prompts)]
    for i, r in enumerate(requests):
        r.put = sink(i)
        try:
            engine.submit(r)
        except ApiError:
            for earlier in requests[:i]:
                engine.cancel(earlier)
            raise
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(engine, choices, events, kind, body, tok, usage),
                                 media_type="text/event-stream")
    return await answer(engine, choices, events, kind, body, tok, request)


def uvicorn_server(app, engine: Engine, settings):
    """A uvicorn.Server whose first SIGTERM or Ctrl-C drains the engine before the server stops."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """First signal: drain with the grace; second: drain with none (every answer cut now, each
            stream still ending with its reason and [DONE]); third: stop without waiting."""
            self.signals = getattr(self, "signals", 0) + 1
            if self.signals > 2 or self.should_exit:
                self.should_exit = self.force_exit = True
                return
            grace = settings.grace if self.signals == 1 else 0.0
            engine.drain(grace)  # the engine's next pass and the loop's next tick see it
            end = asyncio.get_running_loop().time() + grace
            for deadline in list(app.state.readers):  # a body still arriving gets the grace, no more
                deadline.reschedule(min(end, deadline.when() or end))

        async def on_tick(self, counter: int) -> bool:
            if engine.draining is not None and not engine.busy() and not app.state.arriving:
                await asyncio.sleep(0.2)  # the last events reach their streams
                self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=max(1, settings.grace))
    return Server(config)
