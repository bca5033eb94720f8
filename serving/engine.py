"""The decoding engine: a scheduler over --slots rows of KV cache, a runner that owns that cache, and a
detokenizer per request; one thread runs them, and the web side only hands requests in and reads events.

    engine = Engine(model, tok, served, Limits(slots=8, context=1024, queue=64, ...))
    threading.Thread(target=engine.run).start()
    engine.submit(request)        # ApiError(429) when the waiting queue is full, 503 while draining

Between two decoding steps the scheduler ends requests that waited, ran or went unread too long, moves
waiting requests into free slots (first come, first served; an Aligner of another token count than the
running batch waits for it to drain, and blocks those behind it, so no count starves), and the runner
prefills each new prompt straight into its slot's rows of the cache, then decodes one token for every
busy slot, each row at its own position with its own Aligner (aligner.AlignerBatch; row 0 the base).
A request that asks for log-probabilities gets, for each token it is given, the token's own and the
`top` likeliest others (log_softmax of the model's logits, before temperature, as OpenAI and vLLM
report them), for its prompt too when it asks (echo), from the prefill's logits at every position.
A failure while serving one request fails that request and the engine goes on; a step that fails three
times in a row marks the engine unusable (said on /health). Read next: serving/http.py.
"""
import copy
import threading
import time
from dataclasses import dataclass, field

import torch

from aligner import AlignerBatch
from generate import Sampling, sample
from support.adapter_file import Column
from serving.schema import ApiError

STEP_FAILURES = 3  # failed steps in a row after which the engine stops: the device itself is the cause


@dataclass
class Limits:
    """The engine's sizes and time limits (serve.py's flags)."""
    slots: int
    context: int
    queue: int = 64
    queue_seconds: float = 60.0
    request_seconds: float = 600.0
    stall_seconds: float = 30.0
    prompt_chars: int = 0  # a text longer than this cannot fit the context (context x the longest token)


class Detokenizer:
    """A request's text, token by token, decoding only the last few tokens each step: the new text is
    decode(window + new) minus decode(window), so a word's leading space is kept; text that ends in a
    partial character (U+FFFD) waits for the next token."""

    def __init__(self, tok):
        self.tok, self.tokens, self.text = tok, [], ""
        self.start, self.done = 0, 0  # tokens[start:done]: the window already turned into text

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self.tok.decode(self.tokens[self.start: self.done])
        after = self.tok.decode(self.tokens[self.start:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        new = after[len(before):]
        self.start, self.done, self.text = self.done, len(self.tokens), self.text + new
        return new


@dataclass
class Request:
    """One answer being made: its prompt ids, its limits, and where its events go (put(kind, value),
    called from the engine's thread: "logprobs" (how many of `entries` the next text covers), "text",
    "done" (reason, prompt tokens, answer tokens), "error")."""
    ids: list
    served: Column  # the name asked for: its Aligner (or None), template and end-of-answer token
    sampling: Sampling
    max_tokens: int
    stop: list
    put: object
    ignore_eos: bool = False  # vLLM's extension, for benchmarks: answers of a fixed length
    text: Detokenizer = None
    sent: int = 0  # characters of the answer already sent
    slot: int = -1
    pos: int = 0  # the cache column the next token goes to
    arrived: float = field(default_factory=time.monotonic)
    read: float = field(default_factory=time.monotonic)  # when the client last took an event
    put_count: int = 0  # text events put (by the engine's thread)
    taken_count: int = 0  # events the client took (by the web side's thread)
    ended: str = None  # why it ends before its answer does (cancelled, a limit): set from any thread
    generator: torch.Generator = None  # its own random state: sampling never touches the global one
    logprobs: int = None  # alternatives per answer token (None: no log-probabilities)
    prompt_logprobs: int = None  # alternatives per prompt token (None: none; echo asks for them)
    entries: list = field(default_factory=list)  # per answer token: Entry
    prompt_entries: list = None  # per prompt token: None for the first, then Entry
    pending: object = None  # the Entry of the token just picked, kept once emit takes the token

    @property
    def group(self):
        """The token count of its Aligner: requests of one count share a batch (None: the base)."""
        return self.served.aligner.n_tokens if self.served.aligner is not None else None

    def taken(self):
        """The client took an event (called from the web side)."""
        self.read, self.taken_count = time.monotonic(), self.taken_count + 1


@dataclass
class Entry:
    """One token's log-probability and the `top` likeliest tokens at its position, [(id, logprob)]."""
    token: int
    logprob: float
    top: list


def entry(logits, token: int, top: int) -> Entry:
    """The Entry of `token` from the logits (vocab,) of the position that predicts it."""
    logp = torch.log_softmax(logits.float(), -1)  # (vocab,)
    best = torch.topk(logp, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return Entry(token, logp[token].item(), pairs)


class Runner:
    """The model and its cache: --slots rows of --context positions, allocated once; a prompt is
    prefilled straight into its slot's rows; a step decodes one token for the first `rows` slots."""

    def __init__(self, model, served: dict, limits: Limits):
        self.model, self.device = model, model.output.weight.device
        aligned = [(name, s.aligner) for name, s in served.items() if s.aligner is not None]
        self.batchers, self.row = {}, {name: 0 for name in served}  # row 0 of any batcher: the base
        for n in sorted({a.n_tokens for _, a in aligned}) or [1]:
            members = [(name, a) for name, a in aligned if a.n_tokens == n]
            self.batchers[n] = AlignerBatch([a for _, a in members], model.args).to(self.device)
            self.row.update((name, j) for j, (name, _) in enumerate(members, 1))
        self.context, self.rows = limits.context, 0
        self.cache = model.new_cache(limits.slots, limits.context, self.batchers[min(self.batchers)])

    def slot_cache(self, slot: int, batcher):
        """A Cache over one slot's rows of the engine's buffers (views: what it writes lands there)."""
        views = []
        for layer in self.cache.layers:
            view = copy.copy(layer)
            view.k, view.v = layer.k[slot: slot + 1], layer.v[slot: slot + 1]  # (1, S, K, E) each
            views.append(view)
        return self.model.new_cache(1, self.context, batcher, reuse=type(self.cache)(views, self.cache.pad))

    @torch.inference_mode()
    def prefill(self, r: Request, group: int):
        """The request's prompt through the model into its slot; the logits of every position (n, vocab)."""
        batcher = self.batchers[group]
        batcher.use([self.row[r.served.name]])
        ids = torch.tensor([r.ids], device=self.device)  # (1, n)
        at = torch.arange(len(r.ids), device=self.device)  # (n,)
        logits = self.model(ids, batcher, at, cache=self.slot_cache(r.slot, batcher))[0]  # (n, vocab)
        self.rows, r.pos = 0, len(r.ids)  # the batch's Aligner rows set again at the next step
        return logits

    @torch.inference_mode()
    def step(self, slots: list, group: int):
        """One token's logits (b, vocab) for the first b slots, each row at its own position."""
        batcher = self.batchers[group]
        if len(slots) != self.rows:  # the batch's Aligner keys/values for these rows, once per change
            batcher.use([self.row[r.served.name] if r else 0 for r in slots])
            self.cache = self.model.new_cache(len(slots), self.context, batcher, reuse=self.cache)
            self.rows = len(slots)
        ids = torch.tensor([[r.text.tokens[-1] if r else 0] for r in slots], device=self.device)  # (b, 1)
        pos = torch.tensor([[r.pos if r else 0] for r in slots], device=self.device)  # (b, 1)
        return self.model(ids, batcher, pos, cache=self.cache)[:, -1]  # (b, vocab)


class Engine:
    """The scheduler and the loop. submit(), cancel(), drain() and health() may be called from any thread."""

    def __init__(self, model, tok, served: dict, limits: Limits):
        self.tok, self.limits, self.context = tok, limits, limits.context
        self.runner = Runner(model, served, limits)
        self.group = min(self.runner.batchers)  # the token count of the running batch
        self.slots, self.waiting = [None] * limits.slots, []
        self.wakeup, self.stopping = threading.Condition(), threading.Event()
        self.failure, self.failed_steps, self.draining = None, 0, None

    def submit(self, r: Request):
        with self.wakeup:
            if self.failure or self.draining:
                raise ApiError(503, self.failure or "the server is shutting down: retry on another",
                               kind="server_error", retry_after=5)
            if len(self.waiting) >= self.limits.queue:
                raise ApiError(429, f"the server is busy: {len(self.waiting)} requests are waiting; retry",
                               kind="rate_limit_exceeded", retry_after=1)
            r.text = Detokenizer(self.tok)
            r.generator = torch.Generator(self.runner.device).manual_seed(r.sampling.seed)
            self.waiting.append(r)
            self.wakeup.notify()

    def cancel(self, r: Request, why="cancelled"):
        r.ended = r.ended or why
        with self.wakeup:
            self.wakeup.notify()

    def drain(self, grace: float):
        """Stop admitting; end the waiting now and the running after `grace` seconds."""
        with self.wakeup:
            self.draining = time.monotonic() + grace
            self.wakeup.notify()

    def busy(self) -> bool:
        return bool(self.waiting) or any(self.slots)

    def health(self) -> dict:
        state = "failed" if self.failure else "draining" if self.draining else "ok"
        out = {"status": state, "slots": len(self.slots), "free": self.slots.count(None),
               "waiting": len(self.waiting)}
        return {**out, "error": self.failure} if self.failure else out

    def run(self):
        """Admit, prefill, step, until stopped."""
        while not self.stopping.is_set():
            for r in self.admit():
                self.guarded(r, lambda: self.prefilled(r, self.runner.prefill(r, self.group)))
            if any(self.slots):
                self.step()

    def guarded(self, r: Request, work):
        """work() for one request; an error in it fails that request alone."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 -- any failure of one request's work is that request's
            self.fail(r, f"the server failed on this request ({type(e).__name__}: {str(e)[:120]})")

    def fail(self, r: Request, message: str, status=500):
        if r.slot >= 0 and self.slots[r.slot] is r:
            self.slots[r.slot] = None
        r.put("error", (status, message))

    def step(self):
        """One token for every slot up to the last busy one; a failed step fails the rows it held."""
        rows = 1 + max(i for i, r in enumerate(self.slots) if r)
        slots = self.slots[:rows]
        try:
            logits = self.runner.step(slots, self.group)  # (b, vocab)
        except Exception as e:  # noqa: BLE001 -- the batch's requests fail; the engine goes on if it can
            self.failed_steps += 1
            self.runner.rows = 0
            message = f"the server's decoding step failed ({type(e).__name__}: {str(e)[:120]})"
            for r in [r for r in slots if r]:
                self.fail(r, message)
            if self.failed_steps >= STEP_FAILURES:
                self.stop_all(f"{message}, {STEP_FAILURES} times in a row: the engine stopped; restart it")
            return
        self.failed_steps = 0
        for r in [r for r in slots if r]:
            r.pos += 1
            self.guarded(r, lambda: self.emit(r, self.pick(r, logits[r.slot])))

    def stop_all(self, why: str):
        with self.wakeup:
            self.failure = why
            for r in self.waiting + [r for r in self.slots if r]:
                self.fail(r, why, 503)
            self.waiting, self.slots = [], [None] * len(self.slots)

    def prefilled(self, r: Request, logits):
        """After the prompt's logits (n, vocab): its tokens' Entries when asked, then the first token,
        or the end at once for max_tokens 0."""
        if r.prompt_logprobs is not None:
            r.prompt_entries = [None] + [entry(logits[i - 1], r.ids[i], r.prompt_logprobs)
                                         for i in range(1, len(r.ids))]
        if r.max_tokens == 0:
            return self.finish(r, "length")
        self.emit(r, self.pick(r, logits[-1]))

    def pick(self, r: Request, logits) -> int:
        """The request's next token from its logits (vocab,): greedy, or sampled with its own generator."""
        token = int(sample(logits[None].float(), r.sampling, r.generator)[0, 0])
        r.pending = entry(logits, token, r.logprobs) if r.logprobs is not None else None
        return token

    def admit(self) -> list:
        """Requests past a limit ended; waiting requests moved into free slots, first come first served:
        one whose Aligner has another token count than the running batch waits for it to drain."""
        with self.wakeup:
            while not self.stopping.is_set() and not self.busy():
                self.wakeup.wait(0.5)
            self.end_overdue(time.monotonic())
            new = []
            while self.waiting and None in self.slots and not self.draining:
                r = self.waiting[0]
                if r.group not in (None, self.group) and (any(self.slots) or new):
                    break
                self.group = self.group if r.group is None else r.group
                r.slot, r.read = self.slots.index(None), time.monotonic()  # its stall clock starts here
                self.slots[r.slot] = self.waiting.pop(0)
                new.append(r)
            return new

    def end_overdue(self, now: float):
        """Each request that was cancelled, waited, ran or went unread past its limit, ended with why."""
        for r in list(self.waiting):
            why = r.ended or ("the server is shutting down: this request had not started; retry"
                              if self.draining else None)
            if why or now - r.arrived > self.limits.queue_seconds:
                self.waiting.remove(r)
                waited = f"waited more than {self.limits.queue_seconds:g} s for a slot; retry"
                r.put("error", (503, why or waited))
        for r in [r for r in self.slots if r]:
            r.ended = r.ended or self.overdue(r, now)
            if r.ended:
                self.fail(r, r.ended, 503)

    def overdue(self, r: Request, now: float):
        """Why a running request must end now (a limit it passed), or None."""
        lim = self.limits
        if now - r.arrived > lim.request_seconds:
            return f"the request ran past this server's limit of {lim.request_seconds:g} s"
        if r.put_count > r.taken_count and now - r.read > lim.stall_seconds:
            return f"the client read nothing for {lim.stall_seconds:g} s"
        if self.draining and now > self.draining:
            return "the server is shutting down; the answer is cut here"
        return None

    def emit(self, r: Request, token: int):
        """The token's new text to the client; the request ends at its EOS, a stop string, its
        max_tokens or the end of its slot's cache. Every token picked has its Entry, EOS's too (as
        vLLM's): a client that asks for one token with echo reads the prompt's as all but the last."""
        if r.pending is not None:
            r.entries.append(r.pending)
        if token == r.served.eos_id and not r.ignore_eos:
            return self.finish(r, "stop")
        new = r.text.add(token)
        text = r.text.text
        look = max(0, len(text) - len(new) - max((len(s) for s in r.stop), default=0))
        cut = min((text.find(s, look) for s in r.stop if s in text[look:]), default=-1)
        if cut >= 0:
            return self.finish(r, "stop", text[:cut])
        if len(r.text.tokens) >= r.max_tokens or r.pos + 1 >= self.context:
            return self.finish(r, "length")
        hold = max((len(s) - 1 for s in r.stop), default=0)  # a stop string may be starting
        if len(text) - hold > r.sent:
            self.send(r, text[r.sent: len(text) - hold])

    def send(self, r: Request, text: str):
        r.sent += len(text)
        r.put_count += 1
        if r.logprobs is not None:
            r.put("logprobs", len(r.entries))
        r.put("text", text)

    def finish(self, r: Request, reason: str, text=None):
        self.slots[r.slot] = None
        text = self.tok.decode(r.text.tokens) if text is None else text
        if len(text) > r.sent:
            self.send(r, text[r.sent:])
        elif r.logprobs is not None:
            r.put("logprobs", len(r.entries))
        r.put("done", (reason, len(r.ids), len(r.text.tokens)))
