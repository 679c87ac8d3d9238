"""The HTTP side of the Serve application, without Ray: OpenAI-shaped request bodies, their
translation into Predictor rows, responses and errors (`Reply`: what a model replica answers,
rendered into HTTP by the ingress).

No `from __future__ import annotations` here: pydantic and FastAPI resolve these
annotations at run time (docs/pitfalls.md: a FastAPI module with it answered 422 to every POST).
"""

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from actors.config import MESSAGES

MAX_BODY_BYTES = 10 * 1024 * 1024  # docs/contract.md "Security": bodies over 10 MiB get 413
# Deeper bodies get 400 before parsing: Python's JSON reader recurses once per level, and a body
# nested 100,000 levels deep escaped it as a RecursionError (a 500). OpenAI's bodies nest < 10.
MAX_JSON_DEPTH = 64
RETRY_AFTER_S = 1
MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default cap
Number = StrictInt | StrictFloat
ROW_STATUS = {"unknown_adapter": 404, "empty_input": 400, "too_long": 400, "bad_image": 400, "bad_parameter": 400,
              "internal": 500}
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               500: "server_error", 503: "server_error"}
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,")


class ApiError(Exception):
    """An error answered in OpenAI's shape `{"error": {"message", "type", "code"}}`.

    Args:
        status: HTTP status.
        message: what went wrong and what to do about it.
        code: a short machine-readable code (e.g. `model_not_found`, `too_long`).
    """

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def response(self) -> JSONResponse:
        """The error as a JSON response (503 asks the client to retry after a second)."""
        return self.reply().response()

    def reply(self, adapter: str = "unknown") -> "Reply":
        """The error as a model replica's answer (`adapter`: the metrics' adapter tag)."""
        return Reply(self.status, error_body(self.status, self.message, self.code), adapter, self.code)


@dataclass
class Reply:
    """One request's answer, as a model replica hands it to the HTTP ingress.

    Args:
        status: HTTP status.
        body: the JSON body.
        adapter: the metrics' adapter tag: a known model name or "unknown".
        code: the error code (None on success).
    """

    status: int
    body: dict
    adapter: str = "unknown"
    code: str | None = None

    def response(self) -> JSONResponse:
        """The JSON response; a 503 asks the client to retry after RETRY_AFTER_S seconds."""
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(self.body, status_code=self.status, headers=headers)


def error_body(status: int, message: str, code: str) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "code": code}}


# ---------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------


class _Body(BaseModel):
    """Every body names a model (an adapter id or the base model's name); unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(min_length=1)


class CompletionBody(_Body):
    """POST /v1/completions. OpenAI fields Switchyard cannot honour are accepted only at
    their defaults (see `unsupported`)."""

    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0)
    top_p: Number | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)  # torch generators take 64-bit seeds
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(1, ge=1)
    best_of: StrictInt | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: StrictBool = False
    stream_options: dict | None = None
    suffix: StrictStr | None = None
    presence_penalty: Number = 0
    frequency_penalty: Number = 0
    logit_bias: dict | None = None
    user: StrictStr | None = None


class ChatMessage(BaseModel):
    """One chat turn; content as a string (OpenAI's list-of-parts content is refused)."""

    model_config = ConfigDict(extra="forbid")
    role: StrictStr = Field(min_length=1)
    content: StrictStr
    name: StrictStr | None = None


class ChatBody(_Body):
    """POST /v1/chat/completions. OpenAI fields Switchyard cannot honour are accepted only at
    their defaults (see `unsupported`)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0)
    top_p: Number | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(1, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: StrictBool = False
    stream_options: dict | None = None
    presence_penalty: Number = 0
    frequency_penalty: Number = 0
    logit_bias: dict | None = None
    user: StrictStr | None = None


class EmbeddingBody(_Body):
    """POST /v1/embeddings (the openai client asks for base64 unless told otherwise)."""

    input: StrictStr | list[StrictStr]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


class ClassifyBody(_Body):
    """POST /v1/classify: texts (`input`) or base64-encoded PNG/JPEG images (`images`)."""

    input: StrictStr | list[StrictStr] | None = None
    images: list[StrictStr] | None = None


class LoadAdapterBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr
    lora_path: StrictStr | None = None
    load_inplace: StrictBool = False


class UnloadAdapterBody(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body; `lora_int_id` is accepted and ignored)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: StrictStr
    lora_int_id: StrictInt | None = None


async def read_json(request: Any, limit: int = MAX_BODY_BYTES) -> dict:
    """The request's JSON object, refusing bodies over `limit` bytes before parsing them.

    Raises:
        ApiError: 413 for a body over the limit (by Content-Length or by its actual size),
            400 for a body that is not a JSON object.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _too_large(limit) if declared.isdigit() else ApiError(400, "bad Content-Length header", "bad_request")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    depth = json_depth(body) if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH else 0
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the body nests arrays and objects {depth} levels deep; at most {MAX_JSON_DEPTH} are "
                       "accepted", "invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: cannot happen below MAX_JSON_DEPTH; kept a 400
        raise ApiError(400, f"the body is not valid JSON: {type(e).__name__}: {str(e)[:200]}", "invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}", "invalid_body")
    return data


def json_depth(text: bytes) -> int:
    """How deep `[` and `{` nest in a JSON text, brackets inside strings not counted.

    Vectorised running sums in numpy, linear in the body's size: nothing recurses, and a
    body nested 100,000 levels deep costs what a flat body of its size does. For text that
    is not JSON (an unterminated string, unbalanced brackets) the number means little; such
    a body is refused either way.

    Args:
        text: the raw body.

    Returns:
        The greatest nesting depth (0 for a scalar).
    """
    codes = np.frombuffer(bytes(text), dtype=np.uint8)
    quotes = codes == ord('"')
    quotes[_escaped_quotes(codes)] = False
    opens = (codes == ord("[")) | (codes == ord("{"))
    closes = (codes == ord("]")) | (codes == ord("}"))
    events = np.flatnonzero(quotes | opens | closes)  # in text order
    outside = np.cumsum(quotes[events], dtype=np.int32) % 2 == 0  # a bracket after an even number of quotes
    steps = opens[events].astype(np.int8) - closes[events].astype(np.int8)  # +1 opening, -1 closing, 0 quote
    return int(np.cumsum(steps[outside], dtype=np.int32).max(initial=0))


def _escaped_quotes(codes: np.ndarray) -> np.ndarray:
    """Positions of the quotes that an odd run of backslashes escapes."""
    slashes = np.flatnonzero(codes == ord("\\"))
    if not len(slashes):
        return slashes
    breaks = np.diff(slashes) != 1
    starts, ends = slashes[np.r_[True, breaks]], slashes[np.r_[breaks, True]]  # runs of backslashes
    after = ends[(ends - starts) % 2 == 0] + 1  # after a run of odd length (ends - starts + 1)
    after = after[after < len(codes)]
    return after[codes[after] == ord('"')]


def _too_large(limit: int) -> ApiError:
    """413 for a body over `limit` bytes."""
    return ApiError(413, f"the request body is over {limit} bytes; send fewer or smaller inputs per request",
                    "request_too_large")


def parse_body(schema: type[BaseModel], data: dict) -> Any:
    """`data` validated as `schema`; a 400 names the first problems.

    Raises:
        ApiError: 400 with the offending fields.
    """
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:3]]
        raise ApiError(400, "invalid request body: " + "; ".join(problems), "invalid_body") from e


# ---------------------------------------------------------------------------------------
# Bodies into rows
# ---------------------------------------------------------------------------------------


@dataclass
class Work:
    """One request's rows on their way through a coalesced batch or the continuous batcher.

    `adapter` is None for the base model; `params` holds per-row columns (None = the
    server's default); `options` are `Predictor.with_options` overrides ({} = the server's).
    """

    adapter: str | None
    inputs: list
    params: dict[str, list] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    column: str | None = None  # the Predictor column its inputs go in (None: the task's own)
    copies: int = 1  # choices per input (OpenAI's n): input i's copy k is row i * copies + k
    logprobs: int | None = None  # alternatives per token to report (None: no logprobs)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    @property
    def options_key(self) -> tuple:
        """Hashable form of `options` and the input column: requests with equal keys share
        one Predictor call."""
        options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.options.items()))
        return (self.column, *options)

    @property
    def needs_engine(self) -> list[str]:
        """The fields set that only the continuous batcher serves."""
        wanted = {"stream": self.stream, "n": self.copies != 1, "logprobs": self.logprobs is not None}
        return [name for name, on in wanted.items() if on]

    @property
    def rows(self) -> int:
        """Output rows (choices) of the request."""
        return len(self.inputs) * self.copies


def unsupported(body: CompletionBody | ChatBody) -> list[str]:
    """The OpenAI completion and chat fields set to values Switchyard does not implement."""
    problems = {
        "best_of": getattr(body, "best_of", None) not in (None, 1, body.n),
        "echo": getattr(body, "echo", False), "suffix": getattr(body, "suffix", None) is not None,
        "presence_penalty": body.presence_penalty != 0, "frequency_penalty": body.frequency_penalty != 0,
        "logit_bias": bool(body.logit_bias),
    }
    return [name for name, bad in problems.items() if bad]


def completion_work(body: CompletionBody, adapter: str | None, defaults: Any) -> Work:
    """Rows of a completion request; `defaults` is the server's PredictorConfig.

    Raises:
        ApiError: 400 for unsupported fields, an empty prompt list or empty stop strings.
    """
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ApiError(400, "prompt is an empty list; send at least one prompt", "empty_input")
    work = _generation_work(body, adapter, defaults, prompts, body.max_tokens)
    work.logprobs = body.logprobs
    return work


def chat_work(body: ChatBody, adapter: str | None, defaults: Any) -> Work:
    """The row of a chat request (its turns, rendered by the Predictor's chat template).

    Raises:
        ApiError: 400 for unsupported fields or empty stop strings.
    """
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "bad_parameter")
    turns = [m.model_dump(exclude_none=True) for m in body.messages]
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    work = _generation_work(body, adapter, defaults, [turns], limit)
    work.column = MESSAGES
    work.logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return work


def _generation_work(body: CompletionBody | ChatBody, adapter: str | None, defaults: Any, inputs: list,
                     max_tokens: int | None) -> Work:
    """Rows with the sampling fields completions and chat share."""
    bad = unsupported(body)
    if bad:
        raise ApiError(400, f"unsupported field(s) {bad}: Switchyard has no echo, suffix, best_of > n, penalties "
                       "or logit_bias; leave them at their defaults", "unsupported")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and not all(stop):
        raise ApiError(400, f"stop ({stop!r}) must hold non-empty strings", "bad_parameter")
    usage = (body.stream_options or {}).get("include_usage", False)
    if body.stream_options is not None and (not body.stream or set(body.stream_options) - {"include_usage"}
                                            or not isinstance(usage, bool)):
        raise ApiError(400, "stream_options takes only {\"include_usage\": true|false}, with stream: true",
                       "bad_parameter")
    wanted = {"top_p": body.top_p, "seed": body.seed, "stop": stop}
    options = {k: v for k, v in wanted.items() if v is not None and v != getattr(defaults, k)}
    n = len(inputs)
    params = {"max_new_tokens": [max_tokens] * n,
              "temperature": [None if body.temperature is None else float(body.temperature)] * n}
    return Work(adapter, inputs, params, options, copies=body.n, stream=body.stream, include_usage=usage)


def text_work(body: EmbeddingBody | ClassifyBody, adapter: str | None) -> Work:
    """Rows of an embedding or text classification request.

    Raises:
        ApiError: 400 for a missing or empty input, or unsupported `dimensions`.
    """
    if getattr(body, "dimensions", None) is not None:
        raise ApiError(400, "dimensions is not supported: embeddings have the model's hidden size", "unsupported")
    if getattr(body, "images", None) is not None:
        raise ApiError(400, "this deployment classifies text: send `input`, not `images`", "invalid_body")
    if body.input is None:
        raise ApiError(400, "input is missing: send a string or a list of strings", "invalid_body")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input is an empty list; send at least one text", "empty_input")
    return Work(adapter, texts)


def image_work(body: ClassifyBody, adapter: str | None) -> Work:
    """Rows of an image classification request: each image decoded from base64 (a data URL
    prefix is allowed).

    Raises:
        ApiError: 400 for text input, no images, or an image that is not base64.
    """
    if body.input is not None or not body.images:
        raise ApiError(400, "this deployment classifies images: send `images`, a non-empty list of base64 "
                       "PNG/JPEG strings", "invalid_body")
    images = []
    for i, text in enumerate(body.images):
        try:
            images.append(base64.b64decode(_DATA_URL.sub("", text, count=1), validate=True))
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"images[{i}] is not valid base64: {e}", "bad_image") from e
    return Work(adapter, images)


# ---------------------------------------------------------------------------------------
# Rows into responses
# ---------------------------------------------------------------------------------------


def row_error(rows: list[dict], what: str) -> ApiError | None:
    """The request's error when any of its rows failed (the first one, with its index), else None."""
    for i, row in enumerate(rows):
        if row["error"]:
            kind = row["error"].split(":", 1)[0]
            status = ROW_STATUS.get(kind, 500)
            where = f"{what}[{i}]: " if len(rows) > 1 else ""
            return ApiError(status, where + row["error"], "model_not_found" if kind == "unknown_adapter" else kind)
    return None


def completion_response(model: str, rows: list[dict], copies: int = 1) -> dict:
    """OpenAI's text_completion object (choice i is row i; `copies`: choices per prompt)."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": r["generated_text"], "finish_reason": r["finish_reason"],
                     "logprobs": completion_logprobs(r.get("logprobs"))} for i, r in enumerate(rows)],
        "usage": usage(rows, copies),
    }


def chat_response(model: str, rows: list[dict], copies: int = 1) -> dict:
    """OpenAI's chat.completion object (choice i is row i; `copies`: choices per prompt)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r["generated_text"]},
                     "finish_reason": r["finish_reason"], "logprobs": chat_logprobs(r.get("logprobs"))}
                    for i, r in enumerate(rows)],
        "usage": usage(rows, copies),
    }


def usage(rows: list[dict], copies: int = 1) -> dict:
    """OpenAI's usage: each prompt counted once (a prompt's `n` choices share it)."""
    prompt_tokens = sum(r["num_input_tokens"] for r in rows[::copies])
    completion_tokens = sum(r["num_generated_tokens"] for r in rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[dict] | None, offset: int = 0) -> dict | None:
    """Completions' logprobs object from the engine's per-token entries (`offset`: the
    characters of the choice's text before these tokens, for `text_offset`)."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """Chat's logprobs object (`content`: one entry per token, with its alternatives)."""
    if entries is None:
        return None

    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**token(e["token"], e["logprob"]), "top_logprobs": [token(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


def stream_chunk(endpoint: str, request_id: str, model: str, index: int, delta: str | None,
                 logprobs: list[dict] | None, finish_reason: str | None, offset: int = 0) -> dict:
    """One server-sent chunk of a choice, in OpenAI's chunk shape (`delta` None: the chat
    chunk that opens a choice with the assistant's role)."""
    head = {"id": request_id, "created": int(time.time()), "model": model}
    if endpoint == "completions":
        choice = {"index": index, "text": delta or "", "logprobs": completion_logprobs(logprobs, offset),
                  "finish_reason": finish_reason}
        return {**head, "object": "text_completion", "choices": [choice]}
    message = {"role": "assistant", "content": ""} if delta is None else ({"content": delta} if delta else {})
    choice = {"index": index, "delta": message, "logprobs": chat_logprobs(logprobs), "finish_reason": finish_reason}
    return {**head, "object": "chat.completion.chunk", "choices": [choice]}


def usage_chunk(endpoint: str, request_id: str, model: str, rows: list[dict], copies: int) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    kind = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(rows, copies)}


def server_sent(data: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`[DONE]` as is)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def embedding_response(model: str, rows: list[dict], encoding_format: str) -> dict:
    """OpenAI's embedding list; base64 is little-endian float32, as OpenAI sends it."""
    def encode(vector: list[float]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        return vector

    tokens = sum(r["num_input_tokens"] for r in rows)
    return {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": encode(r["embedding"])} for i, r in enumerate(rows)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def classify_response(model: str, rows: list[dict]) -> dict:
    """Switchyard's classification list (docs/contract.md "Online")."""
    return {
        "object": "list", "model": model,
        "data": [{"index": i, "label": r["label"], "label_id": r["label_id"], "scores": r["scores"]}
                 for i, r in enumerate(rows)],
    }


def models_response(base: str, adapters: list[str], created: int) -> dict:
    """OpenAI's model list: the base model, then every adapter (its `parent` is the base)."""
    entries = [{"id": base, "object": "model", "created": created, "owned_by": "switchyard", "root": base,
                "parent": None}]
    entries += [{"id": a, "object": "model", "created": created, "owned_by": "switchyard", "root": base,
                 "parent": base} for a in adapters]
    return {"object": "list", "data": entries}


def base_model_name(model_dir: str) -> str:
    """The base model's name in requests: its folder's name."""
    return Path(model_dir).resolve().name
