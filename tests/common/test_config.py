"""Flags, MMSERVE_* environment variables and validation errors that say how to fix them."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    encoder_arg_parser,
    encoder_config_from_args,
    env_name,
    generator_arg_parser,
    generator_config_from_args,
)


def test_env_name() -> None:
    assert env_name("--max-num-seqs") == "MMSERVE_MAX_NUM_SEQS"


def test_generator_flags_and_defaults() -> None:
    config = generator_config_from_args(
        ["--model", "/m", "--encoder-address", "dns:///enc:50051", "--block-size", "8", "--no-prefix-caching"],
        environ={},
    )
    assert config.engine.model == ModelConfig(model="/m")
    assert config.engine.block_size == 8 and config.engine.enable_prefix_caching is False
    assert config.encoder_address == "dns:///enc:50051"
    assert config.server.port == 50052 and config.server.host == "127.0.0.1"
    assert config.cache.redis_url is None  # no --redis-url: in-process cache
    assert config.engine.num_kv_blocks is None and config.engine.max_model_len is None


def test_environment_sets_defaults_and_flags_win() -> None:
    environ = {"MMSERVE_MODEL": "/env-model", "MMSERVE_MAX_NUM_SEQS": "7", "MMSERVE_NO_PREFIX_CACHING": "true",
               "MMSERVE_REDIS_URL": "redis://127.0.0.1:6379/0", "MMSERVE_NUM_KV_BLOCKS": "128"}
    config = generator_config_from_args(["--max-num-seqs", "9"], environ=environ)
    assert config.engine.model.model == "/env-model"  # --model not required when the variable is set
    assert config.engine.max_num_seqs == 9
    assert config.engine.enable_prefix_caching is False
    assert config.cache.redis_url == "redis://127.0.0.1:6379/0"
    assert config.engine.num_kv_blocks == 128


@pytest.mark.parametrize(
    ("argv", "environ", "enforce_eager", "compiled_on_cpu", "compiled_on_cuda"),
    [
        ([], {}, None, False, True),
        (["--compile"], {}, False, True, True),
        ([], {"MMSERVE_COMPILE": "1"}, False, True, True),
        (["--no-compile"], {}, True, False, False),
        ([], {"MMSERVE_NO_COMPILE": "true"}, True, False, False),
    ],
)
def test_the_language_model_is_compiled_on_cuda_unless_flags_say_otherwise(
    argv: list[str], environ: dict[str, str], enforce_eager: bool | None, compiled_on_cpu: bool, compiled_on_cuda: bool
) -> None:
    model = generator_config_from_args(["--model", "/m", *argv], environ=environ).engine.model
    assert model.enforce_eager is enforce_eager
    assert model.compile_language_model is compiled_on_cpu
    assert dataclasses.replace(model, device="cuda:1").compile_language_model is compiled_on_cuda


def test_compile_and_no_compile_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="--compile and --no-compile: give one of them"):
        generator_config_from_args(["--model", "/m", "--compile", "--no-compile"], environ={})
    assert "compile" not in encoder_arg_parser(environ={}).format_help()  # the vision tower always runs eagerly


def test_encoder_flags() -> None:
    config = encoder_config_from_args(
        ["--model", "/m", "--port", "6000", "--metrics-port", "9100", "--dtype", "bfloat16", "--max-batch-size", "4"],
        environ={},
    )
    assert config.server.port == 6000 and config.server.metrics_port == 9100
    assert config.model.dtype == "bfloat16" and config.max_batch_size == 4


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MMSERVE_MAX_NUM_SEQS": "many"}, "MMSERVE_MAX_NUM_SEQS='many' is not a valid value for --max-num-seqs"),
        ({"MMSERVE_DTYPE": "fp8"}, "MMSERVE_DTYPE='fp8': choose from float32, bfloat16, float16"),
        ({"MMSERVE_NO_PREFIX_CACHING": "maybe"}, "MMSERVE_NO_PREFIX_CACHING='maybe'"),
    ],
)
def test_bad_environment_values(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generator_config_from_args(["--model", "/m"], environ=environ)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ModelConfig(model="/m", device="tpu"), "--device 'tpu': use cpu, cuda or cuda:N"),
        (lambda: ModelConfig(model="/m", dtype="float16"), "float16 is not supported on CPU"),
        (lambda: ModelConfig(model=""), "--model is required"),
        (lambda: EngineConfig(model=ModelConfig("/m"), block_size=0), "--block-size 0: use 1..1024"),
        (lambda: EngineConfig(model=ModelConfig("/m"), num_kv_blocks=0), "--num-kv-blocks 0: use >= 1"),
        (lambda: CacheConfig(redis_url="localhost:6379"), "use redis://host:port/db"),
    ],
)
def test_validation_messages(build: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()  # type: ignore[operator]
    assert message in str(info.value)


def test_configs_are_frozen() -> None:
    config = EngineConfig(model=ModelConfig("/m"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_size = 32  # type: ignore[misc]


def test_help_documents_every_flag_with_its_variable() -> None:
    for parser in (encoder_arg_parser({}), generator_arg_parser({})):
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                flag = max(action.option_strings, key=len)
                assert flag in text and env_name(flag) in text, flag
    assert "--encoder-address" in generator_arg_parser({}).format_help()


def test_missing_model_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        generator_config_from_args([], environ={})
    assert info.value.code == 2
    assert "--model" in capsys.readouterr().err
