"""The HTTP front: OpenAI's /v1/completions (JSON or server-sent events) and /v1/models, /health, /ready
and /metrics, on FastAPI. Each request is checked here (key, size, fields, rate limits), then handed to
the scheduler, whose events it turns into the response; errors are OpenAI's JSON error shape."""
from __future__ import annotations

import asyncio
import json
import math
import secrets
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hpclm.errors import HpclmError
from hpclm.infer import SamplingParams
from hpclm.serve.limits import ClientLimits
from hpclm.serve.scheduler import Completion, Finished, Piece, Rejected

# fields of OpenAI's completions request hpclm reads, and those it accepts only at their default value
UNSUPPORTED_AT = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, 0), "suffix": (None,),
                  "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {})}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
          "stream_options", "user", *UNSUPPORTED_AT}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Mailbox:
    """Hands the scheduler thread's events to the event loop's queues: events posted while the loop is busy
    go over in one wake-up (one call_soon_threadsafe), not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.pending = loop, threading.Lock(), []

    def post(self, queue: asyncio.Queue, event) -> None:
        with self.lock:
            self.pending.append((queue, event))
            first = len(self.pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for queue, event in batch:
            queue.put_nowait(event)


class Served:
    """What the app serves: the model's scheduler, its tokenizer and name, and the server's settings."""

    def __init__(self, scheduler, tokenizer, name: str, cfg, metrics, vocab_size: int):
        self.scheduler, self.tokenizer, self.name, self.cfg, self.metrics = scheduler, tokenizer, name, cfg, metrics
        self.vocab_size = vocab_size
        self.limits = ClientLimits(cfg.requests_per_s, cfg.requests_burst, cfg.tokens_per_min)
        self.created = int(time.time())


def _client(request: Request, cfg) -> str:
    """The client a request counts against: its API key, else its peer address (401 without a valid key)."""
    auth = request.headers.get("authorization", "")
    key = auth[len("bearer "):].strip() if auth.lower().startswith("bearer ") else ""
    if cfg.api_keys and key not in cfg.api_keys:
        raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer KEY' with a key of this server",
                       code="invalid_api_key")
    return f"key:{key}" if key else f"peer:{request.client.host if request.client else '?'}"


async def _body(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes", code="body_too_large")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if not (_is_int(v) if integer else (_is_int(v) or isinstance(v, float))) or not low <= v <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} in [{low}, {high}], got {json.dumps(v)}", param=name)
    return v


class Ask:
    """A completions request, checked."""

    def __init__(self, body: dict, served: Served):
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise ApiError(400, f"unrecognized request argument: {unknown[0]} (this server reads "
                           f"{', '.join(sorted(FIELDS))})", param=unknown[0])
        for name, allowed in UNSUPPORTED_AT.items():
            if name in body and body[name] not in allowed:
                raise ApiError(400, f"'{name}' = {json.dumps(body[name])} is not supported here; leave it out",
                               param=name)
        model = body.get("model", served.name)
        if model != served.name:
            raise ApiError(404, f"the model '{model}' does not exist here: this server serves '{served.name}' "
                           "(GET /v1/models)", param="model", code="model_not_found")
        self.prompt = self._prompt(body.get("prompt"), served)
        cfg, window = served.cfg, served.scheduler.max_length
        self.max_tokens = _number(body, "max_tokens", cfg.default_max_tokens, 1, window or 2**31 - 1, integer=True)
        if window is not None and len(self.prompt) + self.max_tokens > window:
            raise ApiError(400, f"This model's maximum context length is {window} tokens, however you requested "
                           f"{len(self.prompt) + self.max_tokens} tokens ({len(self.prompt)} in your prompt; "
                           f"{self.max_tokens} for the completion). Please reduce your prompt or completion length.",
                           param="prompt", code="context_length_exceeded")
        self.params = SamplingParams(float(_number(body, "temperature", 1.0, 0, 100)),
                                     _number(body, "top_k", 0, 0, 2**31 - 1, integer=True),
                                     float(_number(body, "top_p", 1.0, 0, 1)))
        if self.params.top_p == 0:
            raise ApiError(400, "'top_p' must be > 0 (1: every token)", param="top_p")
        self.seed = _number(body, "seed", None, -2**63, 2**63 - 1, integer=True)
        self.seed = secrets.randbits(63) if self.seed is None else self.seed % 2**63
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
        self.stop = tuple(stop)
        self.stream = body.get("stream", False)
        if not isinstance(self.stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                           param="stream_options")
        self.include_usage = self.stream and options.get("include_usage", False)

    @staticmethod
    def _prompt(prompt, served: Served) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                ids = [int(i) for i in served.tokenizer.encode(prompt)]
            except HpclmError as e:
                raise ApiError(400, f"the prompt cannot be tokenized: {e}", param="prompt") from None
        elif isinstance(prompt, list) and all(_is_int(i) for i in prompt):
            ids = prompt
            bad = [i for i in ids if not 0 <= i < served.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{served.vocab_size - 1})",
                               param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                           param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty: give at least one token", param="prompt")
        return ids


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="hpclm serve", docs_url=None, redoc_url=None, openapi_url=None)
    scheduler, cfg = served.scheduler, served.cfg
    mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind).response()

    @app.get("/health")
    async def health():
        if not scheduler.alive():
            raise ApiError(503, "the scheduler loop has stopped", "server_error")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if scheduler.draining or not scheduler.alive():
            raise ApiError(503, "not ready: the server is shutting down", "server_error", code="draining")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.exposition(), media_type=served.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "hpclm", "max_model_len": scheduler.max_length}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        client = _client(request, cfg)
        ask = Ask(await _body(request, cfg.max_body_bytes), served)
        verdict = served.limits.admit(client, ask.max_tokens)
        if verdict.retry_after:
            served.metrics.reject(f"rate_limit_{verdict.limit}")
            raise ApiError(429, f"Rate limit reached for {verdict.limit} of this client: retry after the "
                           "Retry-After seconds", "requests", code="rate_limit_exceeded",
                           headers={**verdict.headers, "retry-after": str(math.ceil(verdict.retry_after))})
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        mailbox = mailboxes.setdefault(loop, Mailbox(loop))

        def emit(event):  # a plain (not streamed) answer waits only for the end
            if ask.stream or isinstance(event, Finished):
                mailbox.post(events, event)

        def on_finish(c):  # the tokens held for max_tokens but not generated go back to the client's bucket
            served.limits.refund(client, c.max_tokens - len(c.output))

        c = Completion(ask.prompt, ask.max_tokens, ask.params, ask.seed, ask.stop, cfg.request_timeout_s, emit,
                       on_finish)
        try:
            scheduler.submit(c)
        except Rejected as e:
            served.limits.refund(client, ask.max_tokens)
            headers = {**verdict.headers, **({"retry-after": str(math.ceil(e.retry_after))} if e.retry_after else {})}
            raise ApiError(e.status, str(e), "server_error" if e.status == 503 else "requests", code=e.reason,
                           headers=headers) from None
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        headers = {**verdict.headers, "x-request-id": rid}

        def body(text: str, finish_reason: str | None, usage: dict | None = None, choices=True) -> dict:
            out = {"id": rid, "object": "text_completion", "created": created, "model": served.name,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
                   if choices else []}
            if usage is not None:
                out["usage"] = usage
            return out

        def usage(f: Finished) -> dict:
            return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                    "total_tokens": f.prompt_tokens + f.completion_tokens}

        if ask.stream:
            # a token's chunk is this text around the JSON string of its piece
            head, tail = _sse(body("\0", None)).split(json.dumps("\0"))

            async def stream():
                try:
                    while True:
                        event = await events.get()
                        if isinstance(event, Piece):
                            yield head + json.dumps(event.text, ensure_ascii=False) + tail
                            continue
                        if event.reason == "error":
                            yield _sse({"error": {"message": event.error, "type": "server_error", "param": None,
                                                  "code": "generation_ended"}})
                        else:
                            yield _sse(body("", event.reason, None if ask.include_usage else usage(event)))
                            if ask.include_usage:
                                yield _sse(body("", None, usage(event), choices=False))
                        yield "data: [DONE]\n\n"
                        return
                finally:
                    if not c.done:  # the client went away: free the slot at the next step
                        scheduler.cancel(c)

            return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

        while True:
            try:
                event = await asyncio.wait_for(events.get(), 0.5)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(c)
                    return Response(status_code=499)
        if event.reason == "timeout":
            raise ApiError(504, f"the request did not finish within serve.request_timeout_s = {cfg.request_timeout_s} "
                           "s (queue wait included): ask for fewer tokens or retry later", "server_error",
                           code="timeout", headers=headers)
        if event.reason == "error":
            raise ApiError(503 if scheduler.draining else 500, event.error, "server_error", headers=headers)
        return JSONResponse(body(event.text, event.reason, usage(event)), headers=headers)

    return app
