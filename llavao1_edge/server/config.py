"""What `llavao1-edge serve` is configured with; the CLI maps its flags onto these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import EngineConfig, SearchConfig

API_KEY_ENV = "LLAVAO1_API_KEY"  # the key, when --api-key is not given
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    model: str  # text model GGUF
    mmproj: str | None  # its projector
    model_id: str  # the name clients ask for (the `model` field) and /v1/models lists
    host: str = "127.0.0.1"  # loopback by default: nothing outside this machine can call it
    port: int = 8080
    api_key: str | None = None  # every endpoint but /health and the page needs it when set
    parallel: int = 1  # requests searched at once (each its own llama.cpp context; weights loaded once)
    queue: int = 8  # requests that may wait for a worker; beyond that, 503 with Retry-After
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none: no CORS headers
    max_body_bytes: int = 32 * 2**20  # a request body (a base64 image is 4/3 of its bytes)
    max_image_bytes: int = 20 * 2**20  # one decoded image file
    max_tokens: int = 4096  # the most a request's max_tokens may ask for
    search: SearchConfig = field(default_factory=SearchConfig)  # a request's search settings by default
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS
