"""ServerConfig: what the HTTP layer needs, validated at construction (before any rank starts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshlm.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """Listening address, limits, timeouts and the (optional) API key."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "meshlm"
    api_key: str | None = field(default=None, repr=False)  # never printed
    max_body_bytes: int = 1 << 20
    max_n: int = 16  # choices per request (n x prompts)
    request_timeout_s: float = 600.0  # every request's deadline, from arrival; X-Request-Timeout may lower it
    body_timeout_s: float = 30.0  # to receive a request's whole body (408 after)
    default_max_tokens: int = 1024  # new tokens for a request that sends no max_tokens
    drain_timeout_s: float = 30.0
    health_deadline_s: float = 10.0
    retry_after_s: int = 1
    cors_origins: tuple[str, ...] = ()  # CORS stays off unless origins are given

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}.")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("The API key is empty; set the environment variable to a non-empty secret.")
        for name in ("max_body_bytes", "max_n", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("request_timeout_s", "body_timeout_s", "drain_timeout_s", "health_deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
