"""One frozen base, many Aligners, served over the OpenAI API with continuous batching.

    pip install -r requirements-serve.txt          # FastAPI and uvicorn: only this command needs them
    python serve.py --adapter a.pt --adapter b.pt   # or --adapters DIR: every .pt file in it
    curl 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "a", "messages": [{"role": "user", "content": "Name a colour."}]}'

GET /v1/models lists "base" and each Aligner by its file's name; POST /v1/completions (raw text)
and /v1/chat/completions (messages in the Aligner's own template) answer with `model` choosing the
Aligner per request. This file is the command: its flags, loading what it serves, starting the server.
The server is the serving/ package, read in this order: serving/schema.py (the request bodies),
serving/engine.py (the scheduler, the runner that owns the KV cache, the detokenizer), serving/http.py
(the routes, streaming, the drain on SIGTERM).
Not part of the primer. Read next: serving/schema.py, then docs/serving.md.
"""
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from serving.engine import Engine, Limits
from serving.http import make_app, uvicorn_server
from support.adapter_file import column, fitting, load_aligner, one_base
from support.checkpoint import load_base
from support.errors import UserError, run_main
from support.flags import (Runtime, check_flags, count, flag, non_negative_float, parse_flags, path_text,
                           positive_float, positive_int)


@dataclass
class ServeConfig:
    """What to serve, where, and the limits of each request (--help lists these)."""
    adapter: list = flag(None, "an Aligner file to serve, named by its file name (repeatable)", path_text,
                         action="append")
    adapters: str = flag(None, "a directory: serve every .pt file in it", path_text)
    model: str = flag(None, "converted base model directory (default: the adapters' own base)", path_text)
    host: str = flag("127.0.0.1", "address to listen on; anything but loopback should come with --api-key")
    port: int = flag(8000, "port to listen on (0: any free port, printed)", count)
    api_key: str = flag(None, "a Bearer token every request must carry (recommended off loopback)")
    slots: int = flag(8, "rows decoded together: requests beyond these wait", positive_int)
    context: int = flag(1024, "KV cache length per row: prompt + answer tokens at most (capped by the model)",
                        positive_int)
    max_tokens: int = flag(256, "answer length when a request names none", positive_int)
    body_limit: int = flag(1_000_000, "largest request body in bytes", positive_int)
    queue: int = flag(64, "requests that may wait for a slot; one more is answered 429", count)
    queue_timeout: float = flag(60.0, "seconds a request may wait for a slot (then 503)", positive_float)
    request_timeout: float = flag(600.0, "seconds a request may take in all, waiting included",
                                  positive_float)
    stall_timeout: float = flag(30.0, "seconds a client may stall (its body unsent, its answer unread)",
                                 positive_float)
    grace: float = flag(10.0, "on SIGTERM, seconds running answers may finish before they are cut",
                        non_negative_float)

    def __post_init__(self):
        check_flags(self)
        if not self.adapter and not self.adapters:
            raise UserError("name the Aligners to serve: --adapter FILE (repeatable) or --adapters DIR")
        if self.port > 65535:
            raise UserError(f"--port {self.port} is not a port: 0 to 65535")
        key = self.api_key
        if key is not None and (not key or not key.isascii() or not key.isprintable() or " " in key):
            raise UserError("--api-key must be a non-empty key of printable ASCII without spaces "
                            "(what an Authorization header can carry); leave it out for no key")
        for name in ("queue_timeout", "request_timeout", "stall_timeout", "grace"):
            if getattr(self, name) > 86400:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name):g} is over a day")


def load_served(cfg: ServeConfig, runtime: Runtime):
    """(model, tokenizer, {name: Column}): the base once, each Aligner named by its file's name; each
    chat template compiled and tried on a sample conversation here, before the server starts."""
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
    device = runtime.pick_device()
    base = load_base(one_base(adapters, cfg.model), runtime, device)
    model, tok, _ = base
    served = {"base": column("base", None, "alpaca", base)}
    for name, (where, a) in zip(names, adapters):
        fitting(a, model.args, base.path, where)
        try:
            served[name] = column(name, a.to(device), a.meta.get("template", "alpaca"), base)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return model, tok, served


def longest_token(tok, vocab_size: int) -> int:
    """The most characters one token decodes to: a text longer than context x this cannot fit."""
    longest = 1
    for i in range(vocab_size):
        try:
            longest = max(longest, len(tok.decode([i])))
        except (IndexError, ValueError, OverflowError):  # a padding row past the tokenizer's own pieces
            continue
    return longest


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening before anything says "serving"; one line if it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, UnicodeError, ValueError) as e:  # in use, no such address, a name that is no host
        raise UserError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}): is another "
                        f"server using it? "
                        f"choose another --port or --host") from None
    return sock


def serve(cfg: ServeConfig, runtime: Runtime):
    try:
        import uvicorn  # noqa: F401 -- checked here, so that a missing one is one line
    except ImportError:
        raise UserError("serve.py needs FastAPI and uvicorn: pip install -r requirements-serve.txt") from None
    if runtime.compile:
        raise UserError("serve.py does not compile its decoding step yet (rows join and leave every step): "
                        "leave out --compile")
    sock = listening_socket(cfg.host, cfg.port)
    model, tok, served = load_served(cfg, runtime)
    context = min(cfg.context, model.args.max_seq_len)
    limits = Limits(cfg.slots, context, cfg.queue, cfg.queue_timeout, cfg.request_timeout, cfg.stall_timeout,
                    prompt_chars=context * longest_token(tok, model.args.vocab_size) + 1)
    engine = Engine(model, tok, served, limits)
    thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    thread.start()
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: listening on {cfg.host} with no --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    port = sock.getsockname()[1]
    print(f"serving {', '.join(served)} on http://{cfg.host}:{port}/v1 ({cfg.slots} slots of "
          f"{engine.context} tokens); Ctrl-C or SIGTERM drains and stops", file=sys.stderr, flush=True)
    try:
        uvicorn_server(make_app(engine, served, tok, cfg), engine, cfg).run(sockets=[sock])
    finally:
        engine.stopping.set()
        thread.join(timeout=10)
    print("stopped" + (" (drained)" if engine.draining else ""), file=sys.stderr)


def main(argv=None):
    run_main(lambda: serve(*parse_flags(argv, __doc__, ServeConfig, Runtime.for_decoding())))


if __name__ == "__main__":
    main()
