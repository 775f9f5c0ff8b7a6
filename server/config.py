"""Server settings: one typed object, read from flags or ``BPTVLM_*`` environment variables."""

from __future__ import annotations

import importlib.util
import os
from typing import Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .ledger import LEASE_S, POSTGRES_DRIVER_HINT, POSTGRES_SCHEMES

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_CHOICES: tuple[str, ...] = get_args(DtypeName)


class Settings(BaseSettings):
    """Everything the server can be told. Tests build one directly; ``bptvlm serve`` from flags."""

    model_config = SettingsConfigDict(env_prefix="BPTVLM_", extra="forbid")

    model: str = Field(
        default="tiny-random",
        description="'tiny-random', 'embedded', a local CLIP directory or a Hugging Face hub id",
    )
    model_name: str = Field(default="clip", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="name in /v2/models/{name}")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: DtypeName = Field(
        default="auto",
        description="served dtype of weights, activations and caches: 'auto' = bfloat16 where the device has fast "
        "bf16 (CUDA with bf16; a CPU with AVX512-BF16 or AMX), else float32; scores and loss stay float32",
    )
    seed: int = Field(default=0, description="seed of the tiny-random model's weights")

    ledger: str | None = Field(
        default=None,
        description="ledger of keys and usage (`bptvlm keys create`): a SQLite file path, or a postgresql:// "
        "URL for several replicas sharing one; None = in memory",
    )
    replica_id: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="this server's name in the ledger; a restart under the same name frees its crashed "
        "reservations at once (None: a fresh name each start; they are freed after the lease)",
    )
    ledger_lease_s: float = Field(
        default=LEASE_S, gt=0, description="a replica silent this long is gone: its reservations stop counting"
    )
    api_keys: tuple[str, ...] = Field(default=(), description="extra bearer tokens accepted (e.g. from the env)")
    quota: int | None = Field(default=None, ge=0, description="candidates each --api-key token (or anonymous) may use")
    requests_per_minute: int | None = Field(default=None, gt=0, description="rate limit of those tokens")

    outputs: str = Field(
        default="logits",
        description="output policy of the server: logits (every output), probs, loss, topk:K or label; a key's own "
        "policy (`bptvlm keys create --outputs`) can only narrow it (server/policy.py)",
    )
    output_decimals: int | None = Field(default=None, ge=0, le=12, description="round every float output to this many "
                                        "decimals (None: no rounding)")
    output_noise: float = Field(default=0.0, ge=0, description="std of the Gaussian noise added to the logits before "
                                "any output is derived; seeded by key and request id, so a retry gets the same outputs")
    output_noise_seed: int = Field(default=0, description="with the key and request id, fixes the noise: keep it "
                                   "private (a caller who knows it can subtract the noise) and the same across restarts")

    ready_probe_s: float = Field(
        default=30.0, ge=0,
        description="when no forward pass succeeded for this long, run a tiny one (charged to nobody) so that "
        "readiness stays current; 0 = never",
    )
    max_queue: int = Field(default=64, ge=0, description="requests waiting for the model before 503 + Retry-After")
    request_timeout_s: float = Field(default=300.0, gt=0, description="longest wait for the model before 504")
    reply_ttl_s: float = Field(default=600.0, ge=0, description="how long a reply is kept for retried request ids")
    reply_cache_bytes: int = Field(default=256 * 2**20, gt=0, description="byte cap of the reply cache")
    metrics_token: str | None = Field(
        default=None, min_length=16,
        description="bearer token that /metrics needs to show per-key series (without it, only totals)",
    )

    max_body_bytes: int = Field(default=256 * 2**20, gt=0, description="request body, after inflating gzip/deflate")
    max_json_bytes: int = Field(
        default=32 * 2**20, gt=0, description="a JSON body, or the JSON header of a binary one (send big tensors binary)"
    )
    max_response_bytes: int = Field(
        default=64 * 2**20, gt=0, description="largest response (logits are P x N x C floats); over it: 413 before any work"
    )
    max_image_side: int = Field(default=4096, gt=0, description="pixels on each side of an uploaded or inline image")
    max_image_aspect: float = Field(
        default=16.0, ge=1, description="longest over shortest side (preprocessing scales the short side to the model's)"
    )
    max_text_bytes: int = Field(default=1000, gt=0, description="UTF-8 bytes of one class name or context_init")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a connection must send a request's headers within this")
    body_timeout_s: float = Field(default=60.0, gt=0, description="the whole request body must arrive within this (408)")
    keep_alive_s: int = Field(default=5, gt=0, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(default=256, gt=0, description="open connections; more are closed at once")
    max_population: int = Field(default=1024, gt=0)
    max_images: int = Field(default=4096, gt=0)
    max_classes: int = Field(default=1000, gt=0)
    max_batch_images: int | None = Field(
        default=None, gt=0,
        description="images through the vision tower at once (population x images per chunk); "
        "None: 4096 on a GPU; on a CPU 256 x 128 / vision width, or measured at start-up (measure_chunks)",
    )
    measure_chunks: bool = Field(
        default=False,
        description="on a CPU without max_batch_images, choose the vision chunk by a start-up measurement of a few "
        "seconds (server/calibration.py) instead of the formula (off: `bptvlm perf` measured the formula's chunk "
        "faster on the joint generation, BENCHMARKS.md 'Served dtype')",
    )
    pack_linears: bool = Field(
        default=True,
        description="on a CPU, hold the encoders' linears in oneDNN's packed form with the MLP activation fused "
        "(server/packed.py; the same function, faster: BENCHMARKS.md 'The CPU form of the encoders'); costs a second "
        "copy of those weights. False serves the library's modules as they are, and so does compile (its own kernels)",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the vision and text encoders (dynamic shapes; compiled by the start-up probe). "
        "Meant for GPUs; on CPU the results equal the uncompiled ones within 1e-5 (tests/server/test_compile.py); "
        "the speed-up has not been measured",
    )
    image_cache_bytes: int = Field(default=1 * 2**30, gt=0, description="byte cap of the uploaded-image LRU")
    text_cache_bytes: int = Field(
        default=64 * 2**20, gt=0, description="byte cap of the unprompted text-feature LRU (per class-name set)"
    )

    @property
    def open_mode(self) -> bool:
        """No ledger and no tokens: every caller is 'anonymous' (local demos)."""
        return self.ledger is None and not self.api_keys

    @field_validator("ledger", mode="before")
    @classmethod
    def _ledger_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("ledger")
    @classmethod
    def _driver_present(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(POSTGRES_SCHEMES) and importlib.util.find_spec("psycopg") is None:
            raise ValueError(POSTGRES_DRIVER_HINT)
        return value

    @field_validator("outputs")
    @classmethod
    def _policy_known(cls, value: str) -> str:
        from .policy import parse_policy

        return parse_policy(value).name

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value != "auto" and not (value == "cpu" or value.startswith("cuda") or value == "mps"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {value!r}")
        return value
