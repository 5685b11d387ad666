"""The server's settings: one frozen object per process, from `MULTIPLEX_*` environment variables and CLI flags.

Precedence: CLI flag > environment variable > default. `load_settings` validates everything at start and turns a
validation failure into one readable `ConfigError` that names both the flag and the variable.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "MULTIPLEX_"

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
API_AUTH_MODES = ("auto", "required", "open")  # server/api/auth.py TenantResolver's modes


class ConfigError(ValueError):
    """Invalid settings; the message is meant for the person who started the server."""


class Settings(BaseSettings):
    """Everything the server process is configured with; each field is `MULTIPLEX_<FIELD>` or `--<field-name>`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", env_ignore_empty=True,
                                      populate_by_name=True)

    model: str = Field("smollm2", description="backbone: 'smollm2' (embedded SmolLM2-135M-Instruct), 'tiny' (embedded, "
                                              "random weights, for tests), a .gguf file or a HF checkpoint directory")
    adapters: Path | None = Field(None, description="directory of adapters, one per subdirectory (format 1 or PEFT)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0 = any free port)")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = Field("auto", description="'auto' (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16")
    lora_dtype: str = Field("auto", description="dtype of the adapters' low-rank factors on the device: 'auto' (the "
                                                "model's on a GPU, float32 on a CPU: exact), float32, or bfloat16 on "
                                                "a CPU (half their memory and of the bytes a step reads; each factor "
                                                "rounded to bfloat16 at load, the products summed in float32)")
    max_num_seqs: int = Field(64, ge=1, description="most requests running in one batch")
    max_model_len: int | None = Field(None, ge=2, description="context limit of prompt + max_tokens (default: model's)")
    num_kv_blocks: int | None = Field(None, ge=1,
                                      description="KV cache blocks (default: sized by the engine for max_num_seqs)")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    cuda_graphs: bool = Field(True, description="on a GPU, replay decode steps from CUDA graphs (false: all eager)")
    lookahead: bool | None = Field(None, description="schedule and build the next decode step while the forward "
                                                     "runs (default: on a GPU; off on a CPU, see README)")
    max_queue: int = Field(1024, ge=0, description="requests waiting beyond the running batch before answering 503")
    max_queue_per_tenant: int | None = Field(None, ge=1, description="most requests one tenant may have in flight "
                                                                      "(running or waiting) before answering 429 "
                                                                      "(default: half of max_num_seqs + max_queue); "
                                                                      "requests without a tenant are not counted")
    data_dir: Path = Field(Path("./.multiplex"), description="where the server keeps its local state")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    redis_url: str | None = Field(None, validation_alias=AliasChoices("redis_url", "REDIS_URL", "MULTIPLEX_REDIS_URL"),
                                  description="Redis of the adapter registry (env REDIS_URL); unset: an embedded "
                                              "Redis in data_dir")
    redis_chunk_bytes: int = Field(8 << 20, ge=1024, description="adapter blobs are stored in chunks of this size")
    redis_max_connections: int = Field(64, ge=2, description="most Redis connections per replica; a command that "
                                                             "finds all busy waits for one (up to "
                                                             "redis_pool_timeout_s)")
    redis_pool_timeout_s: float = Field(5.0, gt=0, description="how long a Redis command waits for a free "
                                                               "connection before the request answers 503")
    adapter_record_ttl_s: float = Field(10.0, gt=0, description="longest a replica keeps an adapter's registry "
                                                                "record without re-reading it (registry events "
                                                                "invalidate it sooner)")
    admin_token: str | None = Field(None, description="bearer token of /admin (unset: the one in "
                                                      "<data_dir>/admin-token, created mode 0600 with a random "
                                                      "token the first time; the log names the file, not the token)")
    api_keys: str | None = Field(None, description="'key:tenant,...': static API keys; more can be created at run "
                                                   "time (POST /admin/api-keys)")
    api_auth: str = Field("auto", description="who may call /v1 without an API key. auto: anyone until the first "
                                              "API key exists (static or created); from then on a key is required, "
                                              "on every replica and after restarts (recorded in Redis), even once "
                                              "every key is revoked. required: always a key. open: anyone, "
                                              "explicitly (a known key still selects its tenant)")
    max_request_bytes: int = Field(16 << 20, ge=1024,
                                   description="largest request body (the /v1 JSON bodies; the admin upload has "
                                               "max_adapter_bytes): larger is 413 before any of it is read")
    max_prompt_chars: int | None = Field(None, ge=1,
                                         description="most characters of a prompt, or of a chat's messages, "
                                                     "refused with 400 before tokenizing (default: 16 per token of "
                                                     "the context length)")
    max_adapter_bytes: int = Field(512 << 20, ge=1, description="largest adapter upload (and unpacked total)")
    max_rank: int = Field(128, ge=1, description="highest LowRank rank an uploaded adapter may have")
    adapter_pool_bytes: int | None = Field(None, ge=1 << 16,
                                           description="device memory for resident adapters (default 256 MiB on cpu, "
                                                       "2 GiB on cuda)")
    max_adapter_slots: int | None = Field(None, ge=1, description="most adapters resident on the device at once "
                                                                  "(default 64 on cuda, 16 on cpu); with "
                                                                  "adapter_pool_bytes, the device pool's bounds")
    host_cache_bytes: int = Field(2 << 30, ge=1, description="host memory for fetched adapters (LRU)")
    cpu_threads: int | None = Field(None, ge=1, description="on a CPU, intra-op threads of the forward (default: "
                                                            "every core up to 4 cores, else all but one)")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must be 'smollm2', 'tiny', a .gguf file or a checkpoint directory")
        # A name without a path separator may be an embedded model (server/model/catalog.py); a path must exist.
        looks_like_path = os.sep in value or value.startswith(".") or value.startswith("~")
        if value.lower().endswith(".gguf"):
            if not Path(value).expanduser().is_file():
                raise ValueError(f"GGUF file {value!r} does not exist")
        elif looks_like_path and not Path(value).expanduser().is_dir():
            raise ValueError(f"checkpoint directory {value!r} does not exist")
        return value

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_dir():
            raise ValueError(f"adapters directory '{value}' does not exist")
        return value.expanduser() if value is not None else None

    @field_validator("device")
    @classmethod
    def _resolve_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_PATTERN.match(value):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
        if value == "cpu":
            return value
        import torch  # deferred: only resolving or checking a GPU needs it

        if value == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if not torch.cuda.is_available():
            raise ValueError(f"device {value!r} requested but no CUDA GPU is available")
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {value!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        return value

    @field_validator("dtype")
    @classmethod
    def _resolve_dtype(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().lower()
        if value == "auto":
            device = info.data.get("device", "cpu")  # absent only when the device itself was invalid
            return "bfloat16" if device.startswith("cuda") else "float32"
        if value not in _DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {value!r}; use auto, float32, bfloat16 or float16")
        return _DTYPE_ALIASES[value]

    @field_validator("lora_dtype")
    @classmethod
    def _resolve_lora_dtype(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().lower()
        if value == "auto":
            return value
        if _DTYPE_ALIASES.get(value) not in ("float32", "bfloat16"):
            raise ValueError(f"unknown lora_dtype {value!r}; use auto, float32 or bfloat16")
        value = _DTYPE_ALIASES[value]
        device, dtype = info.data.get("device", "cpu"), info.data.get("dtype")
        if device.startswith("cuda") and dtype is not None and value != dtype:
            raise ValueError(f"lora_dtype {value} on a GPU: there the adapters' factors are kept in the model's "
                             f"dtype ({dtype}); use auto")
        return value

    @field_validator("api_auth")
    @classmethod
    def _check_api_auth(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in API_AUTH_MODES:
            raise ValueError(f"unknown API auth mode {value!r}; use one of {', '.join(API_AUTH_MODES)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.strip().upper()
        if value not in _LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}; use one of {', '.join(_LOG_LEVELS)}")
        return value

    @property
    def log_level_number(self) -> int:
        return logging.getLevelName(self.log_level)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with `overrides` (the CLI flags that were given) taking precedence.

    Raises ConfigError with one line per invalid field, naming the flag and the environment variable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        source = f"--{field.replace('_', '-')} / {ENV_PREFIX}{field.upper()}"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        given = f" (got {error['input']!r})" if "input" in error and error["type"] != "extra_forbidden" else ""
        lines.append(f"  {source}: {message}{given}")
    return "\n".join(lines)
