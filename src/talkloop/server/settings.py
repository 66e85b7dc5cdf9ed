"""Server settings: environment (`TALKLOOP_*`), an optional TOML/JSON config file, arguments.

Precedence, highest first: keyword arguments, environment, config file, defaults. `Settings`
is built in `create_app()` (or by the CLI) and injected; there is no module-level instance.
Outside dev mode, weak or well-known secrets are refused at construction.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "TALKLOOP_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"
DB_FILE_NAME = "talkloop.db"
MIN_SECRET_CHARS = 32
WEAK_SECRETS = frozenset(
    {"changethis", "changeme", "secret", "password", "admin", "postgres", "talkloop", "test"}
)


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/talkloop` when XDG_DATA_HOME is set, else `./data`."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) / "talkloop" if xdg else Path("data")


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a `.toml` or `.json` file (top-level keys are field names)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        values = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"config file {path} is not valid {path.suffix or 'TOML'}: {exc}"
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold an object of settings")
    return values


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the file named by the `config_file` argument or `TALKLOOP_CONFIG_FILE`."""

    def __init__(self, settings_cls: type[BaseSettings], init_kwargs: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        path = init_kwargs.get("config_file") or os.environ.get(CONFIG_FILE_ENV)
        self._values = read_config_file(Path(path)) if path else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    config_file: Path | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None  # None: SQLite (WAL) file in data_dir
    redis_url: str | None = None  # None: limits are kept in-process
    redis_prefix: str = "talkloop:limits:"  # Redis key prefix; one per deployment
    rate_limit_requests_per_minute: int | None = Field(default=None, ge=1)  # per key; admin
    rate_limit_tokens_per_minute: int | None = Field(default=None, ge=1)  # rows override
    # How long a replica may apply limits, quotas and prices another replica changed (this
    # replica's own changes apply at once); 0 reads them for every request.
    policy_cache_ttl_s: float = Field(default=1.0, ge=0.0)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # model
    model: str | None = None  # GGUF file or safetensors folder; None = the bundled model
    served_model_name: str | None = None  # the `model` clients send; None = file stem
    # remote OpenAI-compatible replicas (vLLM, SGLang, ...) instead of the built-in engine
    backend_urls: str | None = None  # comma-separated API base URLs, e.g. http://a:8000/v1
    backend_model: str | None = None  # the model name those servers serve (their /v1/models)
    backend_api_key: SecretStr | None = None
    # auto: bfloat16 on CPUs with bf16 dot products (AVX-512 BF16, AMX) and CUDA, else float32
    # (without them bf16 is converted per operand: 5.6x slower prefill on an AVX2 EPYC)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Quantization of the built-in engine's linears (int4: +2.6% perplexity on the bundled
    # model, itself Q4_1, and 2.9x int8's single-stream decode speed with the native kernels;
    # int8: +1.0%).
    quantization: Literal["none", "int8", "int4"] = "int4"
    speculative: Literal["none", "ngram", "draft"] = "none"  # speculative decoding
    draft_model: str | None = None  # for speculative="draft" (see `talkloop train-draft`)
    num_threads: int | None = Field(default=None, ge=1)
    # The built-in engine in a process of its own (true), or on a thread of the server's
    # process (false), where its Python work and the event loop serving HTTP share one GIL.
    # None: a process when the engine leaves a usable CPU free (num_threads below their
    # count), else a thread. The server's share of time to first token at 16 users on 2 cores,
    # 768 requests a mode: with a core free, 4.0% at p50 (-1.7% on the mean) in a process
    # against 4.8% (1.8%) on a thread (bench/results/serve_c16.md; an earlier run: 2.3% (1.3%)
    # against 4.2% (7.2%)); with both cores in the engine, 20.1% in a process against 15.7% on
    # a thread (serve_c16_all_cores.md): the server's work then takes the engine's cores
    # either way, and the process adds a pipe and a process's wake-up to every step.
    engine_process: bool | None = None
    max_model_len: int | None = Field(default=None, ge=1)
    kv_cache_mb: int | None = Field(default=None, ge=1)
    # continuous batching: sequences per step, and tokens per step (chunked prefill + decodes)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=1)
    max_queued_requests: int = Field(default=256, ge=1)
    max_queued_prompt_tokens: int = Field(default=262_144, ge=1)
    default_max_tokens: int = Field(default=512, ge=1)  # when a request names none
    # platform
    dev_mode: bool = False
    admin_key: SecretStr | None = None  # bootstrap admin key; None = generate on first start
    default_tenant: str = "default"
    load_bundled_characters: bool = True
    drain_timeout_s: float = Field(default=30.0, ge=0.0)
    # logs: one JSON object per line (request id, and an access line per request) or text
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    ledger_flush_interval_s: float = Field(default=0.2, gt=0.0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs: dict[str, Any] = getattr(init_settings, "init_kwargs", {})
        file_source = _ConfigFileSource(settings_cls, init_kwargs)
        return init_settings, env_settings, file_source, file_secret_settings

    @model_validator(mode="after")
    def _refuse_weak_secrets(self) -> Settings:
        if self.dev_mode:
            return self
        if self.admin_key is not None:
            _check_secret(self.admin_key.get_secret_value(), "admin_key")
        password = urlsplit(self.db_url).password
        if password is not None:
            _check_secret(password, "the password in database_url")
        return self

    @property
    def db_url(self) -> str:
        """`database_url`, or the SQLite file in `data_dir`."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / DB_FILE_NAME).resolve()}"


def _check_secret(value: str, name: str) -> None:
    if value.lower() in WEAK_SECRETS or len(set(value)) < 8:
        raise ValueError(
            f"{name} is a default or weak secret; set a random one "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`) "
            "or run with dev_mode=true"
        )
    if name == "admin_key" and len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"admin_key must be at least {MIN_SECRET_CHARS} characters")
