"""Server settings: one typed object, read from flags or ``BPTVLM_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the server can be told. Tests build one directly; ``bptvlm serve`` from flags."""

    model_config = SettingsConfigDict(env_prefix="BPTVLM_", extra="forbid")

    model: str = Field(
        default="tiny-random",
        description="'tiny-random', 'embedded', a local CLIP directory or a Hugging Face hub id",
    )
    model_name: str = Field(default="clip", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="name in /v2/models/{name}")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    seed: int = Field(default=0, description="seed of the tiny-random model's weights")

    ledger: Path | None = Field(
        default=None, description="SQLite ledger of keys and usage (`bptvlm keys create`); None = in memory"
    )
    api_keys: tuple[str, ...] = Field(default=(), description="extra bearer tokens accepted (e.g. from the env)")
    quota: int | None = Field(default=None, ge=0, description="candidates each --api-key token (or anonymous) may use")
    requests_per_minute: int | None = Field(default=None, gt=0, description="rate limit of those tokens")

    max_queue: int = Field(default=64, ge=0, description="requests waiting for the model before 503 + Retry-After")
    request_timeout_s: float = Field(default=300.0, gt=0, description="longest wait for the model before 504")
    reply_ttl_s: float = Field(default=600.0, ge=0, description="how long a reply is kept for retried request ids")
    reply_cache_bytes: int = Field(default=256 * 2**20, gt=0)

    max_body_bytes: int = Field(default=256 * 2**20, gt=0)
    max_population: int = Field(default=1024, gt=0)
    max_images: int = Field(default=4096, gt=0)
    max_classes: int = Field(default=1000, gt=0)
    max_batch_images: int | None = Field(
        default=None, gt=0,
        description="images through the vision tower at once (population x images per chunk); "
        "None: 4096 on a GPU, 256 on a CPU",
    )
    image_cache_bytes: int = Field(default=1 * 2**30, gt=0, description="byte cap of the uploaded-image LRU")
    text_cache_bytes: int = Field(
        default=64 * 2**20, gt=0, description="byte cap of the unprompted text-feature LRU (per class-name set)"
    )

    @property
    def open_mode(self) -> bool:
        """No ledger and no tokens: every caller is 'anonymous' (local demos)."""
        return self.ledger is None and not self.api_keys

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value != "auto" and not (value == "cpu" or value.startswith("cuda") or value == "mps"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {value!r}")
        return value
