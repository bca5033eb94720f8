"""The HTTP side: FastAPI routes in OpenAI's shapes, streaming, the API key, and a uvicorn server that
drains on SIGTERM. The event loop only waits: reading a body, parsing, rendering and tokenizing run in
worker threads; the engine runs in its own.

    app = make_app(engine, served, tok, settings)      # settings: serve.py's ServeConfig
    Server(app, engine, settings).run(sock)             # SIGTERM: drain, then exit

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


def prompt_ids(body, served, tok, chat: bool, limits) -> list:
    """The prompt's token ids: raw text for completions; for chat, the messages in the served
    template (the chat template the Aligner was trained with, or one user turn in Alpaca's)."""
    if not chat:
        return tok.encode(fits(body.text(), limits))
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


def make_request(raw: bytes, served: dict, tok, limits, default_tokens: int, chat: bool):
    """(Request without its event sink, the parsed body) from a raw body; a 4xx ApiError otherwise.
    Runs in a worker thread: parsing, template rendering and tokenizing never block the event loop."""
    body = parse(raw, chat)
    if body.model not in served:
        raise ApiError(404, f"the model {json.dumps(body.model)[:60]} does not exist: GET /v1/models lists "
                            f"them", code="model_not_found")
    as_computed = torch.tensor(body.temperature, dtype=torch.float32)  # (): the value the sampling divides by
    if body.temperature > 0 and not as_computed > 0:
        raise ApiError(400, f"'temperature' {body.temperature:g} is 0 in float32, the dtype the sampling "
                            f"runs in: send 0 for greedy decoding, or a larger value")
    context = limits.context
    stop, ids = body.stop_strings(), prompt_ids(body, served[body.model], tok, chat, limits)
    room = context - len(ids) - 1
    if room < 1:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {context}",
                       code="context_length_exceeded")
    asked = (body.max_completion_tokens if chat else None) or body.max_tokens
    if asked is not None and asked > room:
        raise ApiError(400, f"'max_tokens' must be a whole number from 1 to {room} (the room this prompt "
                            f"leaves in the context of {context}), not {asked}")
    max_tokens = asked or min(default_tokens, room)
    sampling = Sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_k=0, top_p=body.top_p,
                        seed=body.seed)
    r = Request(ids, served[body.model], sampling, max_tokens, stop, put=None, ignore_eos=body.ignore_eos)
    return r, body


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


def server_error(value) -> ApiError:
    status, message = value
    return ApiError(status, message, kind="server_error", retry_after=5 if status == 503 else None)


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
        r.taken()
        if event == "error":
            raise server_error(value)
        if event == "done":
            return chunk(kind, f"cmpl-{uuid.uuid4().hex}", name, "".join(text), value[0], usage_of(value))
        text.append(value)


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def stream(engine: Engine, r: Request, events: asyncio.Queue, kind: str, name: str, usage: bool):
    """Server-sent events, as the OpenAI client reads them; every stream ends with `[DONE]`, after a
    finish reason or an error event that says why; a client that leaves cancels the request."""
    rid, kind = f"cmpl-{uuid.uuid4().hex}", f"{kind}.chunk" if kind == "chat" else kind
    try:
        if kind == "chat.chunk":
            first = chunk(kind, rid, name)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield sse(first)
        while True:
            event, value = await events.get()
            r.taken()
            if event == "error":
                yield sse(server_error(value).body)
                break
            if event == "done":
                yield sse(chunk(kind, rid, name, None, value[0]))
                if usage:
                    yield sse({**chunk(kind, rid, name), "choices": [], "usage": usage_of(value)})
                break
            yield sse(chunk(kind, rid, name, value))
        yield sse("[DONE]")
    finally:
        engine.cancel(r)  # nothing if it has finished; frees the slot if the client left


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
        r, body = await asyncio.to_thread(make_request, raw, served, tok, engine.limits, settings.max_tokens,
                                          kind == "chat")
    finally:
        request.app.state.arriving -= 1
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def put(event: str, value):  # called from the engine's thread
        if not loop.is_closed():
            loop.call_soon_threadsafe(events.put_nowait, (event, value))

    r.put = put
    engine.submit(r)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(engine, r, events, kind, body.model, usage),
                                 media_type="text/event-stream")
    return await answer(engine, r, events, kind, body.model, request)


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
