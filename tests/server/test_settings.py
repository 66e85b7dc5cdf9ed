"""Settings: defaults, environment, config file, precedence, and refused weak secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from talkloop.server.settings import Settings

STRONG = "tl-" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bD1fH3"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TALKLOOP_CONFIG_FILE", "TALKLOOP_PORT", "TALKLOOP_HOST", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_serve_localhost_with_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert (settings.host, settings.port, settings.redis_url, settings.model) == (
        "127.0.0.1",
        8000,
        None,
        None,
    )
    assert settings.db_url == f"sqlite:///{tmp_path.resolve() / 'talkloop.db'}"
    assert settings.dev_mode is False


def test_data_dir_defaults_to_xdg_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().data_dir == Path("data")
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/xdg")
    assert Settings().data_dir == Path("/srv/xdg/talkloop")


def test_environment_uses_the_talkloop_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALKLOOP_PORT", "9001")
    monkeypatch.setenv("TALKLOOP_DATABASE_URL", "postgresql+psycopg://app@db:5432/talkloop")
    settings = Settings()
    assert settings.port == 9001
    assert settings.db_url == "postgresql+psycopg://app@db:5432/talkloop"


def test_config_file_is_below_environment_and_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "talkloop.toml"
    config.write_text('host = "0.0.0.0"\nport = 7000\ndtype = "float32"\n')
    monkeypatch.setenv("TALKLOOP_CONFIG_FILE", str(config))
    monkeypatch.setenv("TALKLOOP_PORT", "7001")
    settings = Settings(dtype="bfloat16")
    assert (settings.host, settings.port, settings.dtype) == ("0.0.0.0", 7001, "bfloat16")


def test_json_config_file_given_as_argument(tmp_path: Path) -> None:
    config = tmp_path / "talkloop.json"
    config.write_text('{"port": 7100}')
    assert Settings(config_file=config).port == 7100


def test_unreadable_config_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ValueError, match=r"bad\.toml is not valid"):
        Settings(config_file=bad)


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValidationError, match="prot"):
        Settings(prot=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "secret", ["changethis", "password", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
)
def test_weak_admin_key_is_refused_outside_dev_mode(secret: str) -> None:
    with pytest.raises(ValidationError, match="admin_key is a default or weak secret"):
        Settings(admin_key=secret)
    assert Settings(admin_key=secret, dev_mode=True).admin_key is not None


def test_short_admin_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(admin_key="tl-Abc123XyZ987")


def test_default_database_password_is_refused_outside_dev_mode() -> None:
    url = "postgresql+psycopg://talkloop:changethis@db/talkloop"
    with pytest.raises(ValidationError, match="password in database_url"):
        Settings(database_url=url)
    assert Settings(database_url=url, dev_mode=True).db_url == url


def test_strong_admin_key_is_accepted() -> None:
    settings = Settings(admin_key=STRONG)
    assert settings.admin_key is not None
    assert settings.admin_key.get_secret_value() == STRONG
    assert STRONG not in repr(settings)


def test_engine_settings_reach_the_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from talkloop.server.app import engine_config

    monkeypatch.setenv("TALKLOOP_MAX_NUM_SEQS", "24")
    monkeypatch.setenv("TALKLOOP_MAX_NUM_BATCHED_TOKENS", "1024")
    config = engine_config(Settings(quantization="int4", kv_cache_mb=100, speculative="ngram"))
    assert config.scheduler.max_num_seqs == 24
    assert config.scheduler.max_num_batched_tokens == 1024
    assert config.quantization == "int4" and config.speculative.method == "ngram"
    assert config.cache.kv_cache_bytes == 100 << 20
    with pytest.raises(ValidationError, match="max_num_seqs"):
        Settings(max_num_seqs=0)
    with pytest.raises(ValidationError, match="log_format"):
        Settings(log_format="xml")


@pytest.mark.parametrize(
    ("engine_process", "num_threads", "cores", "expected"),
    [
        (None, None, 2, False),  # every core in the engine: a thread of the server
        (None, 2, 2, False),
        (None, 1, 2, True),  # a core left to the server: a process of its own
        (None, 7, 8, True),
        (True, None, 2, True),  # said outright: as said
        (False, 1, 2, False),
    ],
)
def test_the_engine_gets_its_own_process_when_it_leaves_a_core_free(
    monkeypatch: pytest.MonkeyPatch,
    engine_process: bool | None,
    num_threads: int | None,
    cores: int,
    expected: bool,
) -> None:
    from talkloop.server import app

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    settings = Settings(engine_process=engine_process, num_threads=num_threads)
    assert app.engine_in_a_process(settings) is expected


def test_engine_process_reads_true_and_false_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TALKLOOP_ENGINE_PROCESS", "false")
    assert Settings().engine_process is False
    monkeypatch.setenv("TALKLOOP_ENGINE_PROCESS", "true")
    assert Settings().engine_process is True
