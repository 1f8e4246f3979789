"""`python -m common.client`: generate, encode, info and health from a shell (and as a container healthcheck).

Exit status: 0 on success (`health`: the service is SERVING); 1 on a gRPC error, which prints
`error: <STATUS>: <details>` to stderr, on an unreadable image, or when `health` is not SERVING;
2 on bad usage; 130 on Ctrl-C (the stream is cancelled). Against a server with TLS pass --ssl-ca-certs (and
--ssl-certfile/--ssl-keyfile for mutual TLS); with API keys pass --api-key or set MMSERVE_API_KEY (`health`
needs no key).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from common.client import SERVICE_NAMES, MMServeClient, default_address, format_prompt
from common.client.messages import EmbeddingKey, ImageLike, ResponseCollector, SamplingKwargs
from common.security import tls_credentials

API_KEY_ENV = "MMSERVE_API_KEY"

_GENERATE_HELP = """\
Streams the generated text to stdout as it arrives, then prints one summary line (finish reason, usage) to
stderr. Without --chat the prompt is sent as it is, with one placeholder line per --image in front
("<image>\\n" * n + PROMPT, the LLaVA convention) unless it already holds the model's placeholder or the model
puts images before the text itself (BLIP-2; GetModelInfo says which); with --chat it is sent as one chat user
turn, the images first and then the text, and the server applies the checkpoint's chat template."""


def _image(value: str) -> ImageLike:
    """`key:HEX` names a cached embedding; anything else is an image file path."""
    return EmbeddingKey(value.removeprefix("key:")) if value.startswith("key:") else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m common.client", description="mmserve command-line client.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, default_address: str, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description or help)
        sub.add_argument("--address", help=f"HOST:PORT or dns:///HOST:PORT [default: {default_address}]")
        sub.add_argument("--timeout", type=float, metavar="S", help="deadline of the call in seconds")
        security = sub.add_argument_group("TLS and API key (both off unless given)")
        security.add_argument("--tls", action="store_true", help="TLS, trusting the system's root certificates")
        security.add_argument("--ssl-ca-certs", metavar="PEM", help="TLS, trusting this CA bundle")
        security.add_argument("--ssl-certfile", metavar="PEM", help="client certificate (servers with mutual TLS)")
        security.add_argument("--ssl-keyfile", metavar="PEM", help="private key of --ssl-certfile")
        security.add_argument(
            "--api-key",
            default=os.environ.get(API_KEY_ENV) or None,
            help=f"sent as `authorization: Bearer <key>` [default: ${API_KEY_ENV}]",
        )
        return sub

    generator_default = "$MMSERVE_GENERATOR_ADDRESS or 127.0.0.1:50052"
    encoder_default = "$MMSERVE_ENCODER_ADDRESS or 127.0.0.1:50051"
    gen = command("generate", "stream a generation to stdout", generator_default, _GENERATE_HELP)
    gen.add_argument("prompt", help="the question or instruction")
    gen.add_argument(
        "--image", action="append", default=[], metavar="PATH|key:HEX", help="an image file, or key:HEX (repeatable)"
    )
    gen.add_argument("--chat", action="store_true", help="send a chat user turn instead of a raw prompt")
    gen.add_argument("--max-tokens", type=int, help="tokens to generate [server default: 16]")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [default: 0]")
    gen.add_argument("--seed", type=int, help="sampling seed")

    enc = command("encode", "encode images; print key, cache_hit, num_tokens per image", encoder_default)
    enc.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or key:HEX")
    enc.add_argument(
        "--instruction", default="", help="the prompt, for models whose image embeddings read it (InstructBLIP)"
    )

    for name, help in (("info", "print the model info"), ("health", "print the health; exit 0 only when SERVING")):
        sub = command(name, help, f"{generator_default}; with --service encoder, {encoder_default}")
        sub.add_argument("--service", choices=tuple(SERVICE_NAMES), default="generator", help="[default: generator]")
    return parser


def _generate(client: MMServeClient, args: argparse.Namespace) -> int:
    images = [_image(value) for value in args.image]
    sampling = SamplingKwargs(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.chat:
        content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": args.prompt})
        stream = client.generate(messages=[{"role": "user", "content": content}], **sampling)
    else:
        prompt = format_prompt(client.model_info(), args.prompt, len(images)) if images else args.prompt
        stream = client.generate(prompt, images=images, **sampling)
    collector = ResponseCollector()
    try:
        for response in stream:
            collector.add(response)
            sys.stdout.write(response.text)
            sys.stdout.flush()
    finally:
        stream.close()  # cancels the RPC when we leave early (Ctrl-C)
        if any(collector.texts):
            sys.stdout.write("\n")
    result = collector.result()
    usage = result.usage
    print(
        f"finish_reason={result.finish_reason} prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens} cached_prompt_tokens={usage.cached_prompt_tokens} "
        f"image_tokens={usage.image_tokens}",
        file=sys.stderr,
    )
    return 0


def _encode(client: MMServeClient, args: argparse.Namespace) -> int:
    encoded_images = client.encode([_image(value) for value in args.images], instruction=args.instruction)
    for name, encoded in zip(args.images, encoded_images, strict=True):
        hit = "true" if encoded.cache_hit else "false"
        print(f"key={encoded.embedding_key} cache_hit={hit} num_tokens={encoded.num_tokens} image={name}")
    return 0


def _info(client: MMServeClient, args: argparse.Namespace) -> int:
    info = client.model_info(args.service)
    for field in info.DESCRIPTOR.fields:
        print(f"{field.name}: {getattr(info, field.name)}")
    return 0


def _health(client: MMServeClient, args: argparse.Namespace) -> int:
    status = client.health(args.service, timeout_s=5.0 if args.timeout is None else args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


_COMMANDS: dict[str, Callable[[MMServeClient, argparse.Namespace], int]] = {
    "generate": _generate,
    "encode": _encode,
    "info": _info,
    "health": _health,
}


def _credentials(parser: argparse.ArgumentParser, args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    if not (args.tls or args.ssl_ca_certs or args.ssl_certfile):
        return None
    return tls_credentials(ca_certs=args.ssl_ca_certs, certfile=args.ssl_certfile, keyfile=args.ssl_keyfile)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    service = "encoder" if args.command == "encode" else getattr(args, "service", "generator")
    address = args.address or default_address(service)
    try:
        addresses = (address, None) if service == "generator" else (None, address)
        credentials = _credentials(parser, args)
        with MMServeClient(*addresses, timeout_s=args.timeout, credentials=credentials, api_key=args.api_key) as client:
            return _COMMANDS[args.command](client, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except OSError as exc:  # an unreadable image file
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
