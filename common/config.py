"""Configuration: command-line flags, `MMSERVE_*` environment variables, one frozen dataclass per component.

Every flag `--some-flag` can also be set as `MMSERVE_SOME_FLAG` (a flag on the command line wins). Values
are validated once, when the dataclasses are built, with errors that say how to fix them; nothing mutates a
config afterwards. The services' `__main__` modules call `encoder_config_from_args` /
`generator_config_from_args`; the offline `LLM` builds an `EngineConfig` directly.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
MiB = 1024 * 1024


def default_of(config_class: type, name: str) -> Any:
    """The default of one field of a config dataclass: flags and the offline API take defaults from here, so each
    default is written once, on its dataclass."""
    for item in fields(config_class):
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            if item.default_factory is not MISSING:
                return item.default_factory()
            break
    raise KeyError(f"{config_class.__name__}.{name} has no default")


class ConfigError(ValueError):
    """An invalid setting; the message names the flag and how to fix it."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    revision: str | None = None
    # The language model's decoder layers through torch.compile, bit-identical to eager (common/compilation.py):
    # None = where it was measured to pay (CUDA), eager on CPU, where it did not (docs/torch-compile.md);
    # True = eager (--no-compile); False = compiled on any device (--compile).
    enforce_eager: bool | None = None

    @property
    def compile_language_model(self) -> bool:
        return not self.enforce_eager if self.enforce_eager is not None else self.device.startswith("cuda")

    def __post_init__(self) -> None:
        _check(bool(self.model), "--model is required: a local checkpoint directory or a hub id like llava-hf/...")
        _check(bool(_DEVICE_RE.match(self.device)), f"--device {self.device!r}: use cpu, cuda or cuda:N")
        _check(self.dtype in DTYPES, f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        _check(
            not (self.device == "cpu" and self.dtype == "float16"),
            "--dtype float16 is not supported on CPU: use float32 or bfloat16, or --device cuda",
        )


def _check_readable(path: str | None, flag: str) -> None:
    if path is not None:
        _check(os.path.isfile(path) and os.access(path, os.R_OK), f"{flag} {path!r}: no such readable file")


@dataclass(frozen=True)
class TlsConfig:
    """PEM files of one end of a TLS connection. Server end: `certfile` + `keyfile` turn TLS on; `ca_certs`
    then requires client certificates signed by it (mutual TLS). Client end: TLS is on when any file is set;
    `ca_certs` is the trust root (unset = the system roots), `certfile` + `keyfile` the client certificate."""

    certfile: str | None = None
    keyfile: str | None = None
    ca_certs: str | None = None
    flag_prefix: str = "--ssl"  # names the flags in error messages only

    def __post_init__(self) -> None:
        prefix = self.flag_prefix
        _check(
            (self.certfile is None) == (self.keyfile is None),
            f"{prefix}-certfile and {prefix}-keyfile go together: give both or neither",
        )
        _check_readable(self.certfile, f"{prefix}-certfile")
        _check_readable(self.keyfile, f"{prefix}-keyfile")
        _check_readable(self.ca_certs, f"{prefix}-ca-certs")

    @property
    def enabled(self) -> bool:
        return any(path is not None for path in (self.certfile, self.keyfile, self.ca_certs))


@dataclass(frozen=True)
class ApiKeyConfig:
    """Bearer keys a server accepts: `keys` (from --api-key) plus the lines of `key_file` (re-read when it
    changes, so a rotated secret takes effect without a restart). No key at all = no authentication."""

    keys: tuple[str, ...] = ()
    key_file: str | None = None

    def __post_init__(self) -> None:
        _check(all(key.strip() == key and key for key in self.keys), "--api-key: keys are non-empty, without spaces")
        _check_readable(self.key_file, "--api-key-file")

    @property
    def enabled(self) -> bool:
        return bool(self.keys) or self.key_file is not None


def read_key_file(path: str) -> list[str]:
    """Keys in a file: one per line; blank lines and `#` comments are skipped."""
    with open(path, encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip() and not line.lstrip().startswith("#")]


def split_keys(text: str) -> tuple[str, ...]:
    """`k1,k2` -> ("k1", "k2"): several keys at once, so that a key can be rotated without downtime."""
    return tuple(key.strip() for key in text.split(",") if key.strip())


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port (tests)
    metrics_port: int | None = None
    max_message_bytes: int = 256 * MiB
    shutdown_grace_s: float = 30.0
    tls: TlsConfig = field(default_factory=TlsConfig)
    api_keys: ApiKeyConfig = field(default_factory=ApiKeyConfig)

    def __post_init__(self) -> None:
        _check(
            self.tls.ca_certs is None or self.tls.certfile is not None,
            "--ssl-ca-certs (mutual TLS) needs the server's own --ssl-certfile and --ssl-keyfile",
        )
        _check(0 <= self.port <= 65535, f"--port {self.port}: use 0..65535")
        _check(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            f"--metrics-port {self.metrics_port}: use 0..65535",
        )
        _check(self.max_message_bytes >= 4 * MiB, "--max-message-bytes must be at least 4 MiB (4194304)")
        _check(self.shutdown_grace_s >= 0, "--shutdown-grace-s must be >= 0")


@dataclass(frozen=True)
class CacheConfig:
    """Embedding cache: Redis when `redis_url` is set, else an in-process LRU bounded in bytes."""

    redis_url: str | None = field(default=None, repr=False)  # may hold a password: never printed
    redis_cluster: bool = False  # redis_url names one node of a Redis Cluster
    redis_timeout_ms: float = 50.0
    ttl_s: int = 0  # 0 = entries never expire (Redis eviction policy decides)
    local_cache_bytes: int = 512 * MiB
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        _check(
            self.redis_url is None or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            f"--redis-url scheme {str(self.redis_url).partition(':')[0]!r}: use redis://host:port/db, rediss://... "
            "or unix://path",
        )
        _check(
            not self.redis_cluster or (self.redis_url is not None and not self.redis_url.startswith("unix://")),
            "--redis-cluster needs --redis-url redis://host:port (or rediss://) of one cluster node",
        )
        _check(self.redis_timeout_ms > 0, "--redis-timeout-ms must be > 0")
        _check(self.ttl_s >= 0, "--cache-ttl-s must be >= 0 (0 = no expiry)")
        _check(self.local_cache_bytes >= 0, "--local-cache-bytes must be >= 0")
        _check(self.breaker_failures >= 1, "--redis-breaker-failures must be >= 1")
        _check(self.breaker_cooldown_s >= 0, "--redis-breaker-cooldown-s must be >= 0")


@dataclass(frozen=True)
class EncoderConfig:
    model: ModelConfig
    server: ServerConfig = field(default_factory=lambda: ServerConfig(port=50051))
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0
    max_images_per_request: int = 16
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 40_000_000
    max_pending_images: int = 256  # images of admitted Encode calls in flight; more -> RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        _check(self.max_batch_size >= 1, "--max-batch-size must be >= 1")
        _check(self.max_batch_wait_ms >= 0, "--max-batch-wait-ms must be >= 0")
        _check(self.max_images_per_request >= 1, "--max-images-per-request must be >= 1")
        _check(self.max_image_bytes >= 1, "--max-image-bytes must be >= 1")
        _check(self.max_image_pixels >= 1, "--max-image-pixels must be >= 1")
        _check(
            self.max_pending_images >= 1,
            f"--max-pending-images {self.max_pending_images}: use >= 1 (images in flight before Encode calls are "
            "refused with RESOURCE_EXHAUSTED; 256 is the default)",
        )


@dataclass(frozen=True)
class EngineConfig:
    """The generator engine (also the offline `LLM`'s settings)."""

    model: ModelConfig
    block_size: int = 16
    num_kv_blocks: int | None = None  # None = size the cache from the memory budget below
    kv_cache_memory_gib: float | None = None  # None = 1 GiB on CPU; on CUDA what is free after a warm-up pass
    gpu_memory_utilization: float = 0.9  # CUDA: share of the device memory mmserve may use in all
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(1 <= self.block_size <= 1024, f"--block-size {self.block_size}: use 1..1024 (16 is typical)")
        _check(
            self.num_kv_blocks is None or self.num_kv_blocks >= 1,
            f"--num-kv-blocks {self.num_kv_blocks}: use >= 1, or omit it to size the cache from memory",
        )
        _check(self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0, "--kv-cache-memory-gib must be > 0")
        _check(0 < self.gpu_memory_utilization <= 1, "--gpu-memory-utilization must be in (0, 1]")
        _check(self.max_num_seqs >= 1, "--max-num-seqs must be >= 1")
        _check(self.max_num_batched_tokens >= 1, "--max-num-batched-tokens must be >= 1")
        _check(self.max_model_len is None or self.max_model_len >= 2, "--max-model-len must be >= 2")


@dataclass(frozen=True)
class GeneratorConfig:
    engine: EngineConfig
    server: ServerConfig = field(default_factory=lambda: ServerConfig(port=50052))
    cache: CacheConfig = field(default_factory=CacheConfig)
    encoder_address: str | None = None  # None = encode images in-process (single-process deployments)
    encoder_timeout_s: float = 30.0
    encoder_tls: TlsConfig = field(default_factory=lambda: TlsConfig(flag_prefix="--encoder-ssl"))
    encoder_api_key: str | None = None  # sent to the encoder as `authorization: Bearer <key>`
    max_queue_len: int = 256

    def __post_init__(self) -> None:
        _check(
            self.encoder_address is not None or not (self.encoder_tls.enabled or self.encoder_api_key),
            "--encoder-ssl-* and --encoder-api-key need --encoder-address (without it images are encoded in-process)",
        )
        _check(self.max_queue_len >= 0, "--max-queue-len must be >= 0")
        _check(self.encoder_timeout_s > 0, "--encoder-timeout-s must be > 0")


# ---------------------------------------------------------------------------------------------------------------
# Flags and environment variables


def env_name(flag: str) -> str:
    """`--max-num-seqs` -> `MMSERVE_MAX_NUM_SEQS`."""
    return "MMSERVE_" + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE - {''})}")


def optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none") else int(text)


class _Flags:
    """Adds flags whose defaults come from MMSERVE_* variables when those are set."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self.parser = parser
        self.environ = environ

    def add(
        self,
        flag: str,
        *,
        help: str,
        type: Callable[[str], Any] = str,
        default: Any = None,
        choices: Sequence[str] | None = None,
        required: bool = False,
    ) -> None:
        env = env_name(flag)
        if env in self.environ:
            raw = self.environ[env]
            try:
                default = type(raw)
            except ValueError as exc:
                raise ConfigError(f"{env}={raw!r} is not a valid value for {flag}: {exc}") from None
            if choices is not None and default not in choices:
                raise ConfigError(f"{env}={raw!r}: choose from {', '.join(choices)}")
            required = False
        shown = "" if default is None else f"; default {default}"
        self.parser.add_argument(
            flag, type=type, default=default, choices=choices, required=required, help=f"{help} [{env}{shown}]"
        )

    def switch(self, flag: str, *, help: str) -> None:
        env = env_name(flag)
        default = False
        if env in self.environ:
            try:
                default = _parse_bool(self.environ[env])
            except ValueError as exc:
                raise ConfigError(f"{env}={self.environ[env]!r}: {exc}") from None
        self.parser.add_argument(flag, action="store_true", default=default, help=f"{help} [{env}]")


def _add_model_flags(flags: _Flags) -> None:
    flags.add(
        "--model",
        required=True,
        help="checkpoint of a supported family (LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP, Qwen2-VL, Qwen2.5-VL, "
        "Gemma 3, Idefics3, SmolVLM): a local Hugging Face directory or a hub id",
    )
    flags.add("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    flags.add("--device", default=default_of(ModelConfig, "device"), help="cpu, cuda or cuda:N")
    flags.add("--dtype", default=default_of(ModelConfig, "dtype"), choices=DTYPES, help="weights and activations dtype")


def _add_server_flags(flags: _Flags, port: int) -> None:
    flags.add("--host", default=default_of(ServerConfig, "host"), help="address to listen on (0.0.0.0 in containers)")
    flags.add("--port", type=int, default=port, help="gRPC port (0 = any free port)")
    flags.add("--metrics-port", type=optional_int, help="Prometheus /metrics HTTP port (unset = no metrics server)")
    flags.add(
        "--max-message-bytes",
        type=int,
        default=default_of(ServerConfig, "max_message_bytes"),
        help="largest gRPC message received or sent",
    )
    flags.add(
        "--shutdown-grace-s",
        type=float,
        default=default_of(ServerConfig, "shutdown_grace_s"),
        help="SIGTERM: seconds to let in-flight calls finish",
    )
    flags.add("--ssl-certfile", help="PEM certificate chain of this server: turns TLS on (with --ssl-keyfile)")
    flags.add("--ssl-keyfile", help="PEM private key of --ssl-certfile")
    flags.add(
        "--ssl-ca-certs",
        help="PEM CA bundle: turns mutual TLS on (clients must present a certificate signed by it)",
    )
    flags.add(
        "--api-key",
        help="require `authorization: Bearer <key>` on every RPC but health; comma-separated for several keys "
        "(rotation)",
    )
    flags.add(
        "--api-key-file",
        help="file with accepted API keys, one per line (# comments); re-read when it changes (mounted secrets)",
    )


def _add_cache_flags(flags: _Flags) -> None:
    flags.add(
        "--redis-url",
        help="Redis for the shared embedding cache: redis://[user:password@]host:port/db, rediss://... (TLS) or "
        "unix://path (unset = in-process LRU only); with a password prefer MMSERVE_REDIS_URL (not shown by ps)",
    )
    flags.switch("--redis-cluster", help="--redis-url is one node of a Redis Cluster (the client finds the rest)")
    flags.add(
        "--redis-timeout-ms",
        type=float,
        default=default_of(CacheConfig, "redis_timeout_ms"),
        help="time box for every Redis call",
    )
    flags.add(
        "--cache-ttl-s",
        type=int,
        default=default_of(CacheConfig, "ttl_s"),
        help="expiry of cached embeddings in Redis (0 = none)",
    )
    flags.add(
        "--local-cache-bytes",
        type=int,
        default=default_of(CacheConfig, "local_cache_bytes"),
        help="in-process embedding cache capacity",
    )
    flags.add(
        "--redis-breaker-failures",
        type=int,
        default=default_of(CacheConfig, "breaker_failures"),
        help="consecutive Redis errors that open the breaker",
    )
    flags.add(
        "--redis-breaker-cooldown-s",
        type=float,
        default=default_of(CacheConfig, "breaker_cooldown_s"),
        help="seconds Redis is skipped once open",
    )


def _model(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(model=args.model, device=args.device, dtype=args.dtype, revision=args.revision)


def _server(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        shutdown_grace_s=args.shutdown_grace_s,
        tls=TlsConfig(certfile=args.ssl_certfile, keyfile=args.ssl_keyfile, ca_certs=args.ssl_ca_certs),
        api_keys=ApiKeyConfig(keys=split_keys(args.api_key or ""), key_file=args.api_key_file or None),
    )


def _cache(args: argparse.Namespace) -> CacheConfig:
    return CacheConfig(
        redis_url=args.redis_url or None,
        redis_cluster=args.redis_cluster,
        redis_timeout_ms=args.redis_timeout_ms,
        ttl_s=args.cache_ttl_s,
        local_cache_bytes=args.local_cache_bytes,
        breaker_failures=args.redis_breaker_failures,
        breaker_cooldown_s=args.redis_breaker_cooldown_s,
    )


def encoder_arg_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m encoder_service",
        description="mmserve encoder: images -> projected image embeddings of a vision-language checkpoint over "
        "gRPC, cached by content.",
    )
    flags = _Flags(parser, os.environ if environ is None else environ)
    _add_model_flags(flags)
    _add_server_flags(flags, port=50051)
    _add_cache_flags(flags)
    flags.add(
        "--max-batch-size",
        type=int,
        default=default_of(EncoderConfig, "max_batch_size"),
        help="images per vision-tower forward pass",
    )
    flags.add(
        "--max-batch-wait-ms",
        type=float,
        default=default_of(EncoderConfig, "max_batch_wait_ms"),
        help="how long a batch waits to fill up",
    )
    flags.add(
        "--max-images-per-request",
        type=int,
        default=default_of(EncoderConfig, "max_images_per_request"),
        help="images accepted in one Encode call",
    )
    flags.add(
        "--max-image-bytes",
        type=int,
        default=default_of(EncoderConfig, "max_image_bytes"),
        help="largest accepted image file",
    )
    flags.add(
        "--max-image-pixels",
        type=int,
        default=default_of(EncoderConfig, "max_image_pixels"),
        help="largest accepted width*height",
    )
    flags.add(
        "--max-pending-images",
        type=int,
        default=default_of(EncoderConfig, "max_pending_images"),
        help="images of Encode calls in flight (cache hits included) before further calls are refused with "
        "RESOURCE_EXHAUSTED; a call arriving while none is in flight is always admitted",
    )
    return parser


def encoder_config_from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> EncoderConfig:
    args = encoder_arg_parser(environ).parse_args(argv)
    return EncoderConfig(
        model=_model(args),
        server=_server(args),
        cache=_cache(args),
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        max_images_per_request=args.max_images_per_request,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_pending_images=args.max_pending_images,
    )


def generator_arg_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m generator_service",
        description="mmserve generator: streams a vision-language model's generations over gRPC with a paged KV "
        "cache and continuous batching; images are encoded by the encoder service (or in-process).",
    )
    flags = _Flags(parser, os.environ if environ is None else environ)
    _add_model_flags(flags)
    _add_server_flags(flags, port=50052)
    flags.add(
        "--encoder-address",
        help="encoder service: host:port, a comma-separated list, or dns:///host:port (unset = encode in-process)",
    )
    flags.add(
        "--encoder-timeout-s",
        type=float,
        default=default_of(GeneratorConfig, "encoder_timeout_s"),
        help="upper bound of one Encode call",
    )
    flags.add("--encoder-ssl-ca-certs", help="PEM CA bundle that signed the encoder's certificate: TLS to the encoder")
    flags.add("--encoder-ssl-certfile", help="PEM client certificate for an encoder with mutual TLS")
    flags.add("--encoder-ssl-keyfile", help="PEM private key of --encoder-ssl-certfile")
    flags.add("--encoder-api-key", help="API key sent to the encoder (its --api-key)")
    flags.add("--encoder-api-key-file", help="file holding the API key sent to the encoder (first line)")
    _add_cache_flags(flags)
    flags.add(
        "--block-size", type=int, default=default_of(EngineConfig, "block_size"), help="tokens per KV-cache block"
    )
    flags.add("--num-kv-blocks", type=optional_int, help="KV-cache blocks (unset = from --kv-cache-memory-gib)")
    flags.add(
        "--kv-cache-memory-gib",
        type=float,
        help="KV-cache size when --num-kv-blocks is unset (unset = 1 GiB on CPU; on CUDA what is free after warm-up)",
    )
    flags.add(
        "--gpu-memory-utilization",
        type=float,
        default=default_of(EngineConfig, "gpu_memory_utilization"),
        help="CUDA: share of device memory to use",
    )
    flags.add(
        "--max-num-seqs",
        type=int,
        default=default_of(EngineConfig, "max_num_seqs"),
        help="requests decoded together (running batch)",
    )
    flags.add(
        "--max-num-batched-tokens",
        type=int,
        default=default_of(EngineConfig, "max_num_batched_tokens"),
        help="token budget of one engine step",
    )
    flags.add("--max-model-len", type=optional_int, help="prompt + output limit (unset = the model's maximum)")
    flags.add(
        "--max-queue-len",
        type=int,
        default=default_of(GeneratorConfig, "max_queue_len"),
        help="waiting requests before RESOURCE_EXHAUSTED",
    )
    flags.switch("--no-prefix-caching", help="disable KV prefix caching")
    flags.switch(
        "--compile",
        help="torch.compile the language model at warm-up on any device (default: on CUDA only; on CPU it was "
        "measured to cost start-up time for no speed-up); results are identical to eager",
    )
    flags.switch("--no-compile", help="run the language model eagerly, also on CUDA (a faster start)")
    return parser


def generator_config_from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> GeneratorConfig:
    args = generator_arg_parser(environ).parse_args(argv)
    engine = EngineConfig(
        model=replace(_model(args), enforce_eager=_enforce_eager(args)),
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    return GeneratorConfig(
        engine=engine,
        server=_server(args),
        cache=_cache(args),
        encoder_address=args.encoder_address or None,
        encoder_timeout_s=args.encoder_timeout_s,
        encoder_tls=TlsConfig(
            certfile=args.encoder_ssl_certfile,
            keyfile=args.encoder_ssl_keyfile,
            ca_certs=args.encoder_ssl_ca_certs,
            flag_prefix="--encoder-ssl",
        ),
        encoder_api_key=_encoder_api_key(args),
        max_queue_len=args.max_queue_len,
    )


def _enforce_eager(args: argparse.Namespace) -> bool | None:
    if args.compile and args.no_compile:
        raise ConfigError("--compile and --no-compile: give one of them (neither = compile on CUDA only)")
    return True if args.no_compile else False if args.compile else None


def _encoder_api_key(args: argparse.Namespace) -> str | None:
    if args.encoder_api_key and args.encoder_api_key_file:
        raise ConfigError("--encoder-api-key and --encoder-api-key-file: give one of them")
    if not args.encoder_api_key_file:
        return args.encoder_api_key or None
    _check_readable(args.encoder_api_key_file, "--encoder-api-key-file")
    keys = read_key_file(args.encoder_api_key_file)
    _check(bool(keys), f"--encoder-api-key-file {args.encoder_api_key_file!r} holds no key")
    return keys[0]
