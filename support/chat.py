"""Chat: the model's own chat template (a jinja2 text, rendered as transformers renders it),
conversations read from files, and the labels of a conversation's assistant turns.

    chat = Chat(template_of("checkpoints/smollm2-135m-instruct"), tok)   # the model's template
    chat = chat_of(aligner, "checkpoints/smollm2-135m-instruct", tok)   # the adapter's own, else that
    ids = chat.prompt_ids([{"role": "user", "content": "Hi"}])           # ends with the assistant's cue
    ids, labels = chat.example([{"role": "user", ...}, {"role": "assistant", ...}])
    conversations = read_conversations("chats.jsonl")   # messages, ShareGPT or Alpaca records

A template renders a list of {"role", "content"} messages to text; every assistant turn is labelled
(its text and the closing tokens the template writes after it), the rest is IGNORE. The end-of-turn
token that stops an answer is the first token the template writes after an assistant's text.
Not run on its own. Read next: quantize.py.
"""
import functools
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from support.errors import UserError
from support.inputs import read_json, read_json_object, stdin_lines, valid_text

IGNORE = -100  # the label the loss skips, as data.IGNORE
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


def template_of(model_dir) -> str:
    """The chat template a converted model directory carries (tokenizer_config.json)."""
    config = Path(model_dir) / "tokenizer_config.json"
    source = read_json_object(config).get("chat_template") if config.is_file() else None
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{model_dir} has no chat template (tokenizer_config.json's chat_template): "
                        f"use a checkpoint that ships one, or the Alpaca template (train.py and generate.py "
                        f"--template alpaca; chat.py talks only in a chat template)")
    return source


def hf_template(folder: Path):
    """The chat template of a Hugging Face checkpoint folder: chat_template.jinja, or
    tokenizer_config.json's chat_template (a text, or a list of named ones: "default"); None if absent."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    source = read_json_object(config).get("chat_template") if config.is_file() else None
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) else None


def _raise(message):
    raise jinja2.TemplateError(message)


class Limits:
    """How much one rendering of a stranger's template may take: `seconds` of time and `chars` of
    text (the output, and any string or list an operator in it would build)."""

    def __init__(self, seconds: float = 2.0, chars: int = 2_000_000):
        self.seconds, self.chars = seconds, chars


class BoundedCode(CodeGenerator):
    """jinja2's code generator with `~` (concatenation) joined by the environment, which checks the size."""

    def visit_Concat(self, node, frame):
        self.write("environment.joined((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's sandbox where no single operation may build a value past the limit: the operators
    (`*`, `**`, `%`, `~`), the string methods and the filters that grow a string are checked before
    they run (a loop that builds a value bit by bit is stopped by the time limit)."""
    intercepted_binops = frozenset({"*", "**", "%"})
    code_generator_class = BoundedCode
    limit = Limits().chars

    def joined(self, parts) -> str:
        parts = [str(p) for p in parts]
        check_size(sum(map(len, parts)), self.limit)
        return "".join(parts)

    def wrap_str_format(self, value):
        """str.format and format_map: checked when called (see call)."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        return lambda *args, **kwargs: wrapped(*args, **kwargs) if not check_format(
            value.__self__, args, kwargs, self.limit) else None

    def call(self, context, obj, *args, **kwargs):
        if isinstance(getattr(obj, "__self__", None), str):
            check_size(method_size(obj.__self__, obj.__name__, args, kwargs), self.limit)
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        if operator == "*" and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
            check_size(len(left) * right, self.limit)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            check_size(right * abs(left).bit_length() // 3, self.limit)  # about its decimal digits
        elif operator == "%" and isinstance(left, str):
            check_format(left, right if isinstance(right, tuple) else (right,), {}, self.limit)
        return super().call_binop(context, operator, left, right)


def check_size(size: int, chars: int):
    if size > chars:
        raise jinja2.TemplateError(f"the template builds a value past {chars:,} characters")


def method_size(s: str, name: str, args, kwargs) -> int:
    """An upper bound on the characters a string method makes (its input's size for the others)."""
    ints = [a for a in list(args) + list(kwargs.values()) if isinstance(a, int)]
    texts = [a for a in args if isinstance(a, str)]
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(ints + [0]) + len(s)
    if name == "expandtabs":
        return len(s) * max(ints + [8])
    if name == "replace" and len(texts) >= 2:
        return len(s) + (len(s) + 1) * len(texts[1])
    if name == "join" and args and isinstance(args[0], (list, tuple, str)):
        return len(s) * len(args[0]) + sum(len(str(x)) for x in args[0])
    return len(s)


def check_format(form: str, args, kwargs, chars: int) -> bool:
    """Refuses a format (str.format, `%`) that asks for a width past `chars`: one written in it (seven
    digits or more), or one passed as an argument (`{:>{w}}`, `%*s`)."""
    nested = "*" in form or bool(re.search(r"\{[^{}]*:[^{}]*\{", form))
    numbers = [a for a in list(args) + list(kwargs.values()) if isinstance(a, int)]
    if re.search(r"\d{7,}", form) or (nested and any(abs(n) > chars for n in numbers)):
        raise jinja2.TemplateError(f"the template formats a value wider than {chars:,} characters")
    return False


def bounded(work, seconds: float):
    """work() stopped after `seconds` (a trace function looks at the clock at every line the
    template's compiled code runs), one UserError; a signal (Ctrl-C, SIGTERM) still stops it."""
    deadline = time.monotonic() + seconds

    def watch(frame, event, arg):
        if time.monotonic() > deadline:
            raise TimeoutError
        return watch

    previous = sys.gettrace()
    sys.settrace(watch)
    try:
        return work()
    except TimeoutError:
        raise UserError(f"the chat template took more than {seconds:g} s to render one conversation: "
                        f"it is refused (a template from an untrusted file may loop)") from None
    except (RecursionError, MemoryError) as e:
        raise UserError(f"the chat template cannot render this conversation ({type(e).__name__})") from None
    finally:
        sys.settrace(previous)


def compile_template(source, limits: Limits = Limits()):
    """A jinja2 template in a bounded sandbox, with transformers' settings: trim_blocks, lstrip_blocks,
    loop controls, and the raise_exception, strftime_now and tojson helpers templates call."""
    if not isinstance(source, str) or not valid_text(source):
        raise UserError("the chat template must be a text of valid Unicode (a jinja2 string)")
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.limit = limits.chars
    env.filters["tojson"] = to_json
    for name in ("center", "indent", "wordwrap", "truncate", "format", "replace", "join"):
        env.filters[name] = size_checked(env.filters[name], limits.chars)
    env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return bounded(lambda: env.from_string(source), limits.seconds)
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template is not valid jinja ({type(e).__name__}: {str(e)[:90]})") from None


def to_json(x, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson filter; an indent of more than 64 is refused (it multiplies the size)."""
    if len(str(indent or "")) > 64 or (isinstance(indent, int) and indent > 64):
        raise jinja2.TemplateError("the template asks tojson for an indent of more than 64")
    return json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def size_checked(jinja_filter, chars: int):
    """A filter that grows a string (center, indent, format, replace, join...), checked before it runs."""
    def checked(*args, **kwargs):
        name, values = jinja_filter.__name__, list(args)
        if name in ("do_replace", "do_join"):  # (eval_ctx, value, ...)
            if name == "do_join":
                values[1] = list(values[1])
            check_size(method_size(kwargs.get("d", values[2] if len(values) > 2 else ""), "join", [values[1]],
                                   {}) if name == "do_join" else method_size(str(values[1]), "replace",
                                                                             values[2:4], {}), chars)
        elif name == "do_format":
            check_format(str(values[0]), values[1:], kwargs, chars)
        elif any(isinstance(a, int) and a > chars for a in values[1:] + list(kwargs.values())):
            raise jinja2.TemplateError(f"the template asks for a width past {chars:,} characters")
        return jinja_filter(*values, **kwargs)
    return functools.update_wrapper(checked, jinja_filter)  # with its jinja_pass_arg: eval_ctx first


class Chat:
    """A tokenizer's conversations in a chat template: rendered text, prompt ids, labelled examples."""

    def __init__(self, source: str, tok, limits: Limits = Limits()):
        self.source, self.tok, self.limits = source, tok, limits
        self.template = compile_template(source, limits)
        self.special = {"bos_token": tok.token_text(tok.bos_id), "eos_token": tok.token_text(tok.eos_id)}
        probe = [{"role": "user", "content": "Hi"}]  # tried once on load: a bad template is refused here
        cue = self.render(probe, True)
        closing = self.render(probe + [{"role": "assistant", "content": "Yes"}], False)
        if not closing.startswith(cue + "Yes"):
            raise UserError("the chat template does not write an assistant's answer right after the "
                            "prompt it renders for it; this project cannot label or stop its turns")
        after = tok.encode(closing[len(cue + "Yes"):], bos=False)
        self.stop_id = after[0] if after else tok.eos_id  # the end-of-turn token

    def render(self, messages: list, generation_prompt: bool) -> str:
        """The conversation's text, within the time and size limits (support/chat.py's Limits)."""
        return bounded(lambda: self._render(messages, generation_prompt), self.limits.seconds)

    def _render(self, messages: list, generation_prompt: bool) -> str:
        out, size = [], 0
        try:
            for piece in self.template.generate(messages=messages, add_generation_prompt=generation_prompt,
                                                **self.special):
                out.append(piece)
                size += len(piece)
                if size > self.limits.chars:
                    raise jinja2.TemplateError(f"the output passes {self.limits.chars:,} characters")
        except (RecursionError, MemoryError, TimeoutError):
            raise  # said by bounded()
        except Exception as e:  # noqa: BLE001 -- what a stranger's template raises is the template's fault
            raise UserError(f"the chat template cannot render this conversation ({type(e).__name__}: "
                            f"{str(e)[:100]})") from None
        text = "".join(out)
        if not valid_text(text):
            raise UserError("the chat template writes text that is not valid Unicode (a lone surrogate)")
        return text

    def prompt_ids(self, messages: list) -> list:
        """The ids of a conversation followed by the cue for the assistant's answer."""
        return self.tok.encode(self.render(messages, True), bos=False)

    def example(self, messages: list):
        """(ids, labels) of a whole conversation: each assistant turn labelled, the rest IGNORE."""
        ids = self.tok.encode(self.render(messages, False), bos=False)
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(self.tok.encode(self.render(messages[:i], True), bos=False))
                end = len(self.tok.encode(self.render(messages[: i + 1], False), bos=False))
                labels[start:end] = ids[start:end]
        return ids, labels

    def examples(self, path, max_len: int):
        """([(ids, labels, prompt ids) truncated to max_len, or None where no assistant token is
        left], how many were truncated) of a conversations file."""
        encoded = [self.example(messages) for messages in read_conversations(path)]
        out = []
        for ids, labels in encoded:
            ids, labels = ids[:max_len], labels[:max_len]
            first = next((i for i, y in enumerate(labels) if y != IGNORE), None)
            out.append(None if first is None else (ids, labels, ids[:first]))
        return out, sum(len(ids) > max_len for ids, _ in encoded)


def chat_of(aligner, model_dir, tok) -> Chat:
    """The Chat an Aligner (or None, the base) is asked in: the template recorded in it when it was
    trained with one, else the model directory's own."""
    own = aligner.meta.get("chat_template") if aligner is not None else None
    return Chat(own if isinstance(own, str) else template_of(model_dir), tok)


def read_conversations(path) -> list:
    """The conversations of a JSON or JSONL file, each a list of {"role", "content"}: records of
    {"messages": [...]}, ShareGPT's {"conversations": [{"from", "value"}]}, or Alpaca's
    {"instruction", "input", "output"} (one user turn, one answer). Each bad record is one line."""
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise UserError(f"{path}: expected a non-empty list of records")
    return [conversation(r, f"{path}: record {i}") for i, r in enumerate(records)]


def conversation(r, where: str) -> list:
    if not isinstance(r, dict):
        raise UserError(f"{where} is a {type(r).__name__}, not an object")
    if "messages" in r or "conversations" in r:
        key, role, text = (("messages", "role", "content") if "messages" in r
                           else ("conversations", "from", "value"))
        turns = r[key] if isinstance(r[key], list) and r[key] else None
        if turns is None:
            raise UserError(f"{where}: {key!r} must be a non-empty list of turns")
        messages = [turn(t, f"{where}: {key}[{j}]", role, text) for j, t in enumerate(turns)]
    elif isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
        extra = r.get("input") if isinstance(r.get("input"), str) else ""
        prompt = r["instruction"] + (f"\n{extra}" if extra else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]
    else:
        raise UserError(f"{where} has none of 'messages', 'conversations', or 'instruction' and 'output'")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant turn, so nothing to learn")
    return messages


def turn(t, where: str, role_key: str, text_key: str) -> dict:
    if not isinstance(t, dict):
        raise UserError(f"{where} is a {type(t).__name__}, not an object")
    roles = ROLES if role_key == "role" else tuple(SHAREGPT_ROLES)
    if t.get(role_key) not in roles:
        raise UserError(f"{where}: {role_key} {t.get(role_key)!r} is not one of {', '.join(roles)}")
    if not isinstance(t.get(text_key), str) or not valid_text(t[text_key]):
        raise UserError(f"{where}: {text_key!r} must be a string of valid text")
    return {"role": SHAREGPT_ROLES[t[role_key]], "content": t[text_key]}


def converse(chat: Chat, reply, context: int, answer_room: int):
    """A conversation on standard input: each line is the user's turn, `reply(ids)` streams the
    answer and returns its text. "/reset" starts over, "/quit" (or Ctrl-D) ends. When the
    conversation and room for an answer no longer fit the context, the oldest turns are dropped
    with a note on stderr."""
    print("chat: type a message and press Enter; /reset starts over; /quit or Ctrl-D ends", file=sys.stderr)
    history = []
    for line in stdin_lines(prompt="> " if sys.stdin.isatty() else None):
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = []
            print("(the conversation starts over)", file=sys.stderr)
        elif text:
            kept = fitted(chat, history + [{"role": "user", "content": text}], context, answer_room)
            if kept:  # else the message is refused and the conversation goes on as it was
                history = kept + [{"role": "assistant", "content": reply(chat.prompt_ids(kept))}]


def fitted(chat: Chat, history: list, context: int, answer_room: int) -> list:
    """The history without its oldest turns, as few as needed for it and the answer to fit; empty
    (with a note, and nothing dropped) when the newest message alone does not fit."""
    if len(chat.prompt_ids(history[-1:])) >= context:
        print(f"(note: that message is longer than the model's context of {context} tokens; say it "
              f"shorter)", file=sys.stderr)
        return []
    room = min(answer_room, context // 2)  # the answer's room, never more than half the context
    dropped = 0
    while len(chat.prompt_ids(history)) + room > context and len(history) > 1:
        history, dropped = history[2:] if len(history) > 2 else history[1:], dropped + 1
    if dropped:
        print(f"(note: the {dropped} oldest exchange(s) were dropped to fit the model's context of "
              f"{context} tokens)", file=sys.stderr)
    return history
