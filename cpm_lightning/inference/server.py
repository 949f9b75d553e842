"""The OpenAI-compatible HTTP API that `cpm-lightning serve` runs (docs/inference.md, "Serving"):
`create_app` wraps one loaded model and its tokenizer in a FastAPI app with `GET /v1/models`,
`POST /v1/completions` and `POST /v1/chat/completions`, streamed as server-sent events on request.

One generation runs at a time: requests wait their turn on a FIFO lock, and each generation
has its own KV cache (`generate.tokens`), so no request ever sees another's. Each token is
computed on one worker thread, off the event loop, so the server answers other requests (and
notices a client that left) while a generation runs. A streaming client that disconnects is
noticed by Starlette, which cancels the stream: the lock is released and the generation closed
at its next token.

The model is a base model, so chat is plain text in a template this project defines:

    SYSTEM TEXT            (each system or developer message, on its own line)
    User: USER TEXT        (each user message)
    Assistant: REPLY       (each earlier assistant message)
    Assistant:             (the reply is generated from here, its leading spaces dropped)

and the reply ends at the next turn marker (a line starting `User:` or `Assistant:`), at the
end-of-text token, at a `stop` string or at `max_tokens`.

A request may name a `task` (qa, summarize, translate; core/tasks.py) and, for qa, the `context`
passage: the prompt (of a chat, its one user message) is then that task's input, laid out as
`generate --task` lays it out (the task's prompt embeddings, the input as context in its own
segment) and the output, in a segment of its own, is the text returned.

Every error a client can cause is a 400 (401 for a missing or wrong API key) with OpenAI's
body, `{"error": {"message", "type": "invalid_request_error", "param", "code"}}`, FastAPI's
422 for a body it cannot validate included; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from cpm_lightning.core.errors import UserError, lookup
from cpm_lightning.core.tasks import TASK_PROMPTS, input_text
from cpm_lightning.core.tokenizer import Tokenizer
from cpm_lightning.inference import tasks
from cpm_lightning.inference.generate import continuation, pick, room, tokens
from cpm_lightning.model import CPMAnt

# The chat template (the module docstring): how each role's message is written, what the reply
# follows, and the turn markers the reply stops at.
TURNS = {"system": "{}\n", "developer": "{}\n", "user": "User: {}\n", "assistant": "Assistant: {}\n"}
REPLY = "Assistant:"
TURN_MARKERS = ("\nUser:", "\nAssistant:")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; a chat reply may fill the model
MAX_STOPS = 4  # as OpenAI
UTF8_MAX = 4  # bytes of a character


def chat_prompt(messages: list[Message]) -> str:
    """The text the model continues for a chat (the template of the module docstring)."""
    return "".join(TURNS[m.role].format(m.text) for m in messages) + REPLY


class _Body(BaseModel):
    # Unknown fields and values of the wrong type are refused (400), not ignored or coerced:
    # a client that sends a setting this server does not apply should learn so.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    """A last chunk with the usage counts and no choices, as OpenAI sends."""


class Sampling(_Body):
    """The fields that completions and chat share (OpenAI's names and ranges)."""

    model: str
    """The id `GET /v1/models` lists."""
    max_tokens: int | None = Field(None, ge=1)
    """New tokens at most; unset: 16 for a completion, the rest of the model's length for a chat."""
    temperature: float = Field(1.0, ge=0, le=2)
    """0 is greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Sample among the likeliest tokens of this total probability."""
    stop: str | list[str] | None = None
    """Up to 4 strings; the text ends before the first that appears (it is not returned)."""
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    """Seed of the sampling; unset: a random one."""
    stream: bool = False
    """Server-sent events, one chunk per piece of text, then `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    n: int = 1
    """Choices per request: only 1."""
    user: str | None = None
    """The caller's end user, as OpenAI takes it (not used)."""
    task: str | None = None
    """This server's own: qa, summarize or translate, whose input the prompt is (the module
    docstring); unset: the prompt is continued as text."""
    context: str | None = None
    """With `task`: the passage a question is about, read before it."""


class CompletionRequest(Sampling):
    prompt: str | list[str]
    """The text to continue (a list: of one text)."""


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    """Who wrote it (not used: the template has no names)."""

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name of max_tokens."""


BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest}


class BadRequest(Exception):
    """A request the server refuses: the message, the field it is about, OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


@dataclass
class Finished:
    """One generation, as the app's log (`app.state.log`) records it when it ends."""

    id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """stop (end of text, a stop string or a turn marker), length (max_tokens), disconnected
    (the client left mid-stream; the generation stopped there) or error (the model failed)."""


@dataclass
class _Job:
    id: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[str, ...]
    strip: bool
    """Drop the leading spaces of the text (a chat reply, which follows `Assistant:`)."""
    task: str | None = None
    """The task whose input `prompt` is: its output is decoded alone, not after the prompt."""
    completion_tokens: int = 0
    finish_reason: str = "disconnected"  # until the generation ends otherwise


@dataclass
class _Text:
    """The text of a growing list of new tokens, released as pieces that never need taking back:
    the tail that may be the start of a stop string, or an unfinished UTF-8 character (decoded
    as U+FFFD), is held back until the next token settles it."""

    tokenizer: Tokenizer
    job: _Job
    new: list[int] = field(default_factory=list)
    sent: int = 0
    stopped: bool = False

    def add(self, token: int) -> str:
        self.new.append(token)
        text = self._text()
        hits = [i for s in self.job.stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped = True
            return self._release(text[:min(hits)])
        held = max((k for s in self.job.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        # SentencePiece decodes each byte of an unfinished character as one U+FFFD, and a
        # character's bytes number at most 4; a longer run of U+FFFD will never be text.
        held = max(held, min(len(text) - len(text.rstrip("\ufffd")), UTF8_MAX - 1))
        return self._release(text[:len(text) - held])

    def rest(self) -> str:
        """At the end of a generation not stopped by a stop string: what was held back."""
        return "" if self.stopped else self._release(self._text())

    def _text(self) -> str:
        text = continuation(self.tokenizer, [] if self.job.task else self.job.prompt, self.new)
        return text.lstrip() if self.job.strip else text

    def _release(self, upto: str) -> str:
        piece, self.sent = upto[self.sent:], max(self.sent, len(upto))
        return piece


def create_app(model: CPMAnt, tokenizer: Tokenizer, name: str, api_key: str | None = None,
               prompting: str | None = None) -> FastAPI:
    """The API around `model` (in eval mode) and its tokenizer, listed as model `name`;
    with `api_key`, every request must carry `Authorization: Bearer API_KEY`. `prompting`: how
    prompts are presented (generate.PROMPTINGS; unset: the model's default)."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpm-generate")
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown(cancel_futures=True)

    app = FastAPI(title="cpm-lightning", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.log = []  # Finished, one per generation, in the order they end
    turn = asyncio.Lock()  # FIFO: requests are served in the order they arrive
    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)

    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        return error_response(e.status, str(e), e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e: RequestValidationError):
        return error_response(400, *_validation_message(e.errors(), BODIES.get(request.url.path)))

    @app.exception_handler(UserError)  # from inside a generation: the model's, not the request's
    async def model_failed(request, e: UserError):
        return error_response(500, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code="not_found"
                              if e.status_code == 404 else None)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "cpm-lightning"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id != name:
            raise BadRequest(f"model {model_id!r} does not exist; this server serves {name!r}", "model",
                             "model_not_found", 404)
        return model_card()

    def prepare(body: Sampling, prompt: str, param: str, max_tokens: int | None, default: int | None,
                stops: tuple[str, ...], strip: bool) -> _Job:
        """The generation `body` asks for, or a BadRequest; `param` names the field of the prompt."""
        if body.model != name:
            raise BadRequest(f"model {body.model!r} does not exist; this server serves {name!r}", "model",
                             "model_not_found")
        if body.n != 1:
            raise BadRequest(f"n must be 1 (one choice per request), got {body.n}", "n")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > MAX_STOPS or "" in stop:
            raise BadRequest(f"stop: expected up to {MAX_STOPS} non-empty strings, got {stop!r}", "stop")
        if body.context is not None and body.task is None:
            raise BadRequest("context: the passage of a task's input; give the task too (task: qa)", "context")
        if body.task is not None:
            try:
                lookup(TASK_PROMPTS, body.task, "task")
            except UserError as e:
                raise BadRequest(f"task: {e}", "task") from None
        ids = tokenizer.encode(input_text(prompt, body.context) if body.task else prompt)
        try:
            left = room(model.cfg, ids, prompting, tasks.prompt_len(model.cfg, body.task) if body.task else None)
        except UserError as e:
            raise BadRequest(str(e), param, "context_length_exceeded") from None
        wanted = max_tokens or default or left
        if wanted > left:
            raise BadRequest(f"max_tokens {wanted}: the prompt is {len(ids)} tokens and the model's maximum length is "
                             f"{model.cfg.max_len}, so at most {left} new tokens fit", "max_tokens",
                             "context_length_exceeded")
        return _Job(f"{uuid.uuid4().hex}", ids, wanted, body.temperature, body.top_p, body.seed,
                    (*stops, *stop), strip, body.task)

    async def pieces(job: _Job) -> AsyncIterator[str]:
        """The text of `job` as it is generated, waiting for its turn first; records it in the log."""
        async with turn:
            generator = torch.Generator()
            if job.seed is None:
                generator.seed()  # a fresh random seed: torch's default seed is a constant
            else:
                generator.manual_seed(job.seed)
            top_p = job.top_p if job.top_p < 1 else None
            steps = (tasks.steps(model, job.prompt, job.task, job.max_tokens, tokenizer.eos_id,
                                 lambda logits: pick(logits, job.temperature, None, top_p, generator)) if job.task
                     else tokens(model, job.prompt, job.max_tokens, job.temperature, None, top_p, tokenizer.eos_id,
                                 generator, prompting))
            text = _Text(tokenizer, job)
            try:
                while not text.stopped:
                    token = await asyncio.wrap_future(worker.submit(next, steps, None))
                    if token is None:
                        break
                    job.completion_tokens += 1
                    if piece := text.add(token):
                        yield piece
                if piece := text.rest():
                    yield piece
                job.finish_reason = "length" if job.completion_tokens == job.max_tokens and not text.stopped \
                    else "stop"
            except Exception:
                job.finish_reason = "error"
                raise
            finally:  # also when the client left (the stream is cancelled): stop at the next token
                worker.submit(steps.close)
                app.state.log.append(Finished(job.id, len(job.prompt), job.completion_tokens, job.finish_reason))

    def usage(job: _Job) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens,
                "total_tokens": len(job.prompt) + job.completion_tokens}

    async def respond(body: Sampling, job: _Job, kind: str, choice: Callable[[str, str | None], dict],
                      first: dict | None = None):
        """The whole response (`choice(text, finish_reason)`), or its stream of chunks."""
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        head = {"id": f"{prefix}-{job.id}", "created": int(time.time()), "model": name}
        if not body.stream:
            text = "".join([piece async for piece in pieces(job)])
            return {**head, "object": kind, "choices": [choice(text, job.finish_reason)], "usage": usage(job)}
        chunk_kind = f"{kind}.chunk" if kind == "chat.completion" else kind
        with_usage = body.stream_options is not None and body.stream_options.include_usage

        def event(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': choices, **extra})}\n\n"

        async def events():
            extra = {"usage": None} if with_usage else {}
            if first:
                yield event([first], **extra)
            async for piece in pieces(job):
                yield event([choice(piece, None)], **extra)
            yield event([choice("", job.finish_reason)], **extra)
            if with_usage:
                yield event([], usage=usage(job))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise BadRequest(f"prompt: a list of {len(body.prompt)} texts; this server completes one per request",
                             "prompt")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        work = prepare(body, prompt, "prompt", body.max_tokens, COMPLETION_MAX_TOKENS, (), strip=False)
        return await respond(body, work, "text_completion", lambda text, reason: {
            "index": 0, "text": text, "logprobs": None, "finish_reason": reason})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        if body.task is None:
            work = prepare(body, chat_prompt(body.messages), "messages", body.max_completion_tokens or body.max_tokens,
                           None, TURN_MARKERS, strip=True)
        elif [m.role for m in body.messages] != ["user"]:
            raise BadRequest(f"messages: with task {body.task}, one user message (the task's input); got the roles "
                             f"{', '.join(m.role for m in body.messages)}", "messages")
        else:
            work = prepare(body, body.messages[0].text, "messages", body.max_completion_tokens or body.max_tokens,
                           None, (), strip=False)
        if body.stream:
            return await respond(body, work, "chat.completion", lambda text, reason: {
                "index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason},
                first={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None})
        return await respond(body, work, "chat.completion", lambda text, reason: {
            "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason})

    return app


def _validation_message(errors, body: type[BaseModel] | None) -> tuple[str, str | None]:
    """(message, param) of one of pydantic's errors for a request body: the first of those
    deepest in it (of a union's members, the one that got furthest)."""
    e = max(errors, key=lambda e: len(e["loc"]))
    # The location after "body", without the names pydantic gives the members of a union
    # ("str", "list[str]"): messages[0].content, not body.messages.0.content.list[TextPart].
    # (An unknown field, last in its location, is kept.)
    last = len(e["loc"]) - 1 if e["type"] == "extra_forbidden" else None
    loc = [part for i, part in enumerate(e["loc"])
           if i and (isinstance(part, int) or part in _FIELD_NAMES or i == last)]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if e["type"] == "json_invalid":
        return f"the body is not valid JSON: {e['ctx']['error']} at character {e['loc'][1]}", None
    if param is None:
        return "the body must be a JSON object of the request's fields", None
    if e["type"] == "extra_forbidden":
        valid = ", ".join(body.model_fields) if body is not None and len(loc) == 1 else None
        return f"{param}: unknown field" + (f"; expected one of: {valid}" if valid else ""), param
    return f"{param}: {e['msg']}", param


_FIELD_NAMES = {n for m in (CompletionRequest, ChatRequest, Message, TextPart, StreamOptions) for n in m.model_fields}


class _RequireKey:
    """ASGI middleware: a 401 in OpenAI's error shape for a request without `Authorization:
    Bearer KEY`, before its body is read."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""),
                                                               self.expected):
            response = error_response(401, "missing or wrong API key: expected the header `Authorization: Bearer "
                                      "KEY` with the key `serve` was given", code="invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
