"""`hpclm serve` settings: the [serve] table of a TOML file (`--config`), `--set serve.KEY=VALUE` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field

from hpclm import config as config_mod
from hpclm.config import ConfigError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 serves every interface: the user's explicit choice
    port: int = 8000  # 0: any free port (the one chosen is printed)
    model_name: str = ""  # the id clients send as `model`; "": the checkpoint's run directory name
    threads: int = 0  # torch threads; 0: torch's default
    max_running: int = 16  # sequences decoded together
    max_queued: int = 64  # requests waiting for a running slot; beyond: 429
    max_queued_tokens: int = 65536  # prompt tokens waiting, all queued requests together; beyond: 429
    max_prefill_tokens: int = 256  # prompt tokens fed per scheduler step, so running streams keep flowing
    default_max_tokens: int = 16  # a request's max_tokens when it sends none (OpenAI's default)
    request_timeout_s: float = 300.0  # queue wait + generation; past it: finish_reason "timeout" (stream) or 504
    drain_timeout_s: float = 30.0  # after SIGTERM: time given to admitted requests before they end with an error
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    api_keys: list = field(default_factory=list)  # non-empty: a request needs `Authorization: Bearer KEY` (else 401)
    requests_per_s: float = 0.0  # per client (API key, else peer address); 0: no limit
    requests_burst: int = 0  # requests a client may send at once; 0: max(1, requests_per_s)
    tokens_per_min: int = 0  # generated tokens per client per minute (max_tokens held at admission); 0: no limit


@dataclass
class ServeFile:
    serve: ServeConfig = field(default_factory=ServeConfig)


def validate(file: ServeFile) -> None:
    c = file.serve
    checks = [
        (0 <= c.port <= 65535, "serve.port must be in 0..65535 (0: any free port)"),
        (c.threads >= 0, "serve.threads must be >= 0 (0: torch's default)"),
        (c.max_running >= 1, "serve.max_running must be >= 1"),
        (c.max_queued >= 0 and c.max_queued_tokens >= 1, "serve.max_queued must be >= 0 and max_queued_tokens >= 1"),
        (c.max_prefill_tokens >= 1, "serve.max_prefill_tokens must be >= 1"),
        (c.default_max_tokens >= 1, "serve.default_max_tokens must be >= 1"),
        (c.request_timeout_s > 0 and c.drain_timeout_s >= 0, "serve.request_timeout_s must be > 0 and drain_timeout_s >= 0"),
        (c.max_body_bytes >= 1024, "serve.max_body_bytes must be >= 1024"),
        (c.requests_per_s >= 0 and c.requests_burst >= 0 and c.tokens_per_min >= 0,
         "serve.requests_per_s, requests_burst and tokens_per_min must be >= 0 (0: no limit)"),
        (all(k.strip() == k and k for k in c.api_keys), "serve.api_keys must be non-empty strings without spaces around them"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load(path=None, overrides=()) -> ServeConfig:
    return config_mod.load(path, overrides, make=ServeFile, check=validate).serve
