"""The API's request bodies, declared once as pydantic models (as FastAPI expects): every field with
its type, its range and the words an error about it uses; fields this server does not do are refused
by name, not ignored; text must be valid Unicode (no lone surrogates).

    body = parse(raw_bytes, chat=False)   # a Completion, or ApiError(400) naming the first bad field

A completion's prompt is a text, a list of token ids, or a list of either (one answer each, `n`
answers a prompt: choice i * n + j); `echo` puts the prompt before the answer and, with `logprobs`,
its tokens' log-probabilities first (the first token's is null). Limits that depend on the server
(the context, the vocabulary, the model names) are checked by the engine's caller (serving/http.py)
after the prompt is tokenized. Read next: serving/engine.py.
"""
import json
from typing import Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from typing_extensions import Annotated

from support.inputs import valid_text


class ApiError(Exception):
    """A request the server refuses or fails: an HTTP status and OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind="invalid_request_error", code=None, retry_after=None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after
        self.body = {"error": {"message": message, "type": kind, "code": code, "param": None}}


def _text(value: str) -> str:
    if not valid_text(value):
        raise ValueError("not valid text")
    return value


Text = Annotated[str, AfterValidator(_text)]
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "suffix", "logit_bias",
               "parallel_tool_calls")
MAX_N, MAX_LOGPROBS = 16, 20  # answers per prompt; alternatives per token (OpenAI: 5, vLLM: 20)


class Strict(BaseModel):
    """Types as written: no "1" for 1, no true for 1, no NaN; unknown fields ignored, as OpenAI's are."""
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="true or false")


class ResponseFormat(Strict):
    type: Literal["text"] = Field("text", description="text: this server writes no JSON modes")


class TextPart(Strict):
    type: Literal["text"] = Field(description="text (the only kind of part this server reads)")
    text: Text = Field(description="a string of valid text")


class Message(Strict):
    role: Literal["system", "user", "assistant"] = Field(description="one of system, user, assistant")
    content: Union[Text, list[TextPart]] = Field(description="a string of valid text or a list of text parts")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Common(Strict):
    """The fields both routes share."""
    model: str = Field(description="a model name that GET /v1/models lists")
    max_tokens: Optional[int] = Field(None, ge=1, description="a whole number of at least 1")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="a number from 0 to 2")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="a number above 0, at most 1")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="a whole number from 0 to 2147483647")
    stop: Union[None, Text, list[Text]] = Field(None, description="a string or a list of at most 4 strings")
    stream: bool = Field(False, description="true or false")
    stream_options: Optional[StreamOptions] = Field(None, description="an object")
    ignore_eos: bool = Field(False, description="true or false")
    n: int = Field(1, ge=1, le=MAX_N, description=f"a whole number from 1 to {MAX_N}")
    best_of: int = Field(1, ge=1, le=1, description="1: no candidates ranked (n: answers)")
    response_format: Optional[ResponseFormat] = Field(None, description="an object whose type is text")
    presence_penalty: float = Field(0, ge=0, le=0, description="0: this server applies no penalties")
    frequency_penalty: float = Field(0, ge=0, le=0, description="0: this server applies no penalties")

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, body):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for key in UNSUPPORTED:
            value = body.get(key)
            if not (value is None or value is False or value in ([], {}, "")):  # 0 is a value, not "off"
                raise ApiError(400, f"'{key}' is not supported by this server")
        return body

    def stop_strings(self) -> list:
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings")
        return stop


class Completion(Common):
    prompt: Union[Text, list[Text], list[int], list[list[int]]] = Field(
        description="a non-empty string of valid text, a list of token ids, or a list of either")
    max_tokens: Optional[int] = Field(None, ge=0, description="a whole number of at least 0 (0: with echo)")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS,
                                    description=f"a whole number from 0 to {MAX_LOGPROBS}, or null")
    echo: bool = Field(False, description="true or false")

    def prompts(self) -> list:
        """Each prompt: a text or a list of token ids, none empty."""
        p = self.prompt
        prompts = [p] if isinstance(p, str) or p and isinstance(p[0], int) else p
        if not prompts or not all(prompts):
            raise ApiError(400, "'prompt' must be a non-empty text, a non-empty list of token ids, or a "
                                "non-empty list of either, none empty")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "'max_tokens' 0 asks for no answer: send it with echo true (the prompt's "
                                "log-probabilities), or at least 1")
        return prompts


class ChatCompletion(Common):
    messages: list[Message] = Field(min_length=1, description="a non-empty list of messages")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="a whole number of at least 1")
    logprobs: bool = Field(False, description="true or false")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS,
                                        description=f"a whole number from 0 to {MAX_LOGPROBS}, or null")

    def top(self):
        """The alternatives a token of the answer comes with (None: no logprobs asked)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true")
        return (self.top_logprobs or 0) if self.logprobs else None


PARTS = (Message, TextPart, StreamOptions, ResponseFormat)
DESCRIPTIONS = {top: {name: f.description for model in (top, *PARTS)
                       for name, f in model.model_fields.items()}
                for top in (Completion, ChatCompletion)}  # per route: "logprobs" is a number in one


def where(loc: tuple, descriptions: dict) -> str:
    """A pydantic error's location as a path: ('messages', 0, 'content', 'str') -> messages[0].content"""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in descriptions:
            path += f".{part}" if path else part
    return path


def parse(raw: bytes, chat: bool):
    """The body as a Completion or ChatCompletion, or an ApiError(400) that names the first bad field,
    what it must be, and what was sent."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    top = ChatCompletion if chat else Completion
    try:
        return top.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        field = where(first["loc"], DESCRIPTIONS[top])
        given = json.dumps(first.get("input"), default=str)[:40] if first["type"] != "missing" else "missing"
        expected = DESCRIPTIONS[top].get(field.rsplit(".", 1)[-1].split("[")[0], first["msg"])
        raise ApiError(400, f"'{field}' must be {expected}, not {given}") from None
