"""`make demo`: the whole mmserve flow on one machine, end to end over gRPC.

    1. start the encoder and the generator services as child processes on free loopback ports
       (with the Redis at 127.0.0.1:6379 when one answers, else each keeps an in-process cache)
    2. wait until both report SERVING on their gRPC health service
    3. ask a question about the image, twice, streaming the answer to stdout as it is generated
    4. show the second request was a cache hit: the encoder's Encode reports cache_hit for the image,
       the generator reused the image's KV blocks (usage.cached_prompt_tokens > 0), and the metrics agree
    5. SIGTERM both services and check that they drain and exit 0

The demo checkpoint has random weights: the answer is word salad, the point is the flow. Exit code 0 when
every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from common.client import MMServeClient
from protos import encoder_pb2, generator_pb2

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
START_TIMEOUT_S = 120.0


@dataclass
class Service:
    name: str
    address: str
    metrics_port: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def log_tail(self, lines: int = 20) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def redis_answers(url: str) -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # not installed, refused, timed out: run without it
        return False


@contextlib.contextmanager
def start(name: str, args: Sequence[str], port: int, metrics_port: int, scratch: Path) -> Iterator[Service]:
    log = (scratch / f"{name}.log").open("w+b")
    command = [sys.executable, "-m", f"{name}_service", *args, "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", str(metrics_port)]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        yield Service(name, f"127.0.0.1:{port}", metrics_port, process, log)
    finally:
        if process.poll() is None:  # only on an early failure: the normal path has stopped it already
            process.kill()
            process.wait(timeout=10)
        log.close()


def wait_serving(service: Service, client: MMServeClient) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if service.process.poll() is not None:
            raise RuntimeError(f"the {service.name} exited with {service.process.returncode}:\n{service.log_tail()}")
        with contextlib.suppress(grpc.RpcError):
            if client.health(service.name, timeout_s=1.0) == "SERVING":
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {service.name} did not report SERVING in {START_TIMEOUT_S:g} s")
        time.sleep(0.2)


def blip_prompt(question: str) -> str:
    """The prompt of models that put the image in front of the text and have no chat template (BLIP-2)."""
    return f"Question: {question} Answer:"


def ask(
    client: MMServeClient, info: encoder_pb2.ModelInfo, image: Path, question: str, max_tokens: int
) -> generator_pb2.Usage:
    """Stream one answer to stdout; returns the usage of the last message. A chat turn rendered by the checkpoint's
    chat template, or for a model that puts images before the text (BLIP-2) the raw "Question: ... Answer:"."""
    started = time.perf_counter()
    first_token_s = None
    usage = generator_pb2.Usage()
    print("  answer: ", end="", flush=True)
    sampling: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "timeout_s": 60}
    if info.images_before_text:
        stream = client.generate(blip_prompt(question), images=[str(image)], **sampling)
    else:
        content = [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]
        stream = client.generate(messages=[{"role": "user", "content": content}], **sampling)
    for response in stream:
        if response.token_ids and first_token_s is None:
            first_token_s = time.perf_counter() - started
        print(response.text, end="", flush=True)
        if response.HasField("usage"):
            usage = response.usage
    total_s = time.perf_counter() - started
    print()
    ttft = "n/a" if first_token_s is None else f"{first_token_s * 1000:.0f} ms"
    print(f"  {usage.completion_tokens} tokens, first after {ttft}, all in {total_s * 1000:.0f} ms; prompt "
          f"{usage.prompt_tokens} tokens ({usage.image_tokens} image), "
          f"{usage.cached_prompt_tokens} from the KV prefix cache")  # fmt: skip
    return usage


def stop(service: Service, timeout: float = 60.0) -> int:
    service.process.send_signal(signal.SIGTERM)
    try:
        return service.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait(timeout=10)
        return -9


def run(args: argparse.Namespace) -> int:
    checks: list[tuple[str, bool]] = []
    redis_url = DEFAULT_REDIS if redis_answers(DEFAULT_REDIS) else None
    cache = f"Redis at {redis_url}" if redis_url else "no Redis at 127.0.0.1:6379: in-process caches"
    print(f"mmserve demo: {args.model}, image {args.image}; {cache}")
    print("  (the demo checkpoint has random weights: the answers are noise, the mechanics are real)")
    redis_flags = ["--redis-url", redis_url] if redis_url else []
    encoder_port, generator_port, encoder_metrics, generator_metrics = free_ports(4)
    with tempfile.TemporaryDirectory(prefix="mmserve-demo-") as scratch_dir:
        scratch = Path(scratch_dir)
        encoder_args = ["--model", args.model, *redis_flags, "--shutdown-grace-s", "10"]
        generator_args = ["--model", args.model, "--encoder-address", f"127.0.0.1:{encoder_port}", *redis_flags,
                          "--shutdown-grace-s", "10"]  # fmt: skip
        with (
            start("encoder", encoder_args, encoder_port, encoder_metrics, scratch) as encoder,
            start("generator", generator_args, generator_port, generator_metrics, scratch) as generator,
            MMServeClient(generator.address, encoder.address) as client,
        ):
            started = time.perf_counter()
            wait_serving(encoder, client)
            wait_serving(generator, client)
            info = client.model_info()
            print(f"1. encoder at {encoder.address} and generator at {generator.address} are SERVING "
                  f"({time.perf_counter() - started:.1f} s); model family {info.family}, "
                  f"{info.tokens_per_image or 'size-dependent'} tokens per image")  # fmt: skip

            print(f"2. first request: {args.question!r}")
            hits_before = encoder.metric("mmserve_encoder_cache_hits_total")
            first = ask(client, info, args.image, args.question, args.max_tokens)
            cold = encoder.metric("mmserve_encoder_cache_hits_total") == hits_before
            print(f"  the image embedding was {'computed by the encoder' if cold else 'already cached'}")

            print("3. the same image and question again")
            second = ask(client, info, args.image, args.question, args.max_tokens)
            checks.append(("second answer reused the image's KV blocks (cached_prompt_tokens > 0)",
                           second.cached_prompt_tokens > 0))  # fmt: skip
            checks.append(("both answers have the same length", first.completion_tokens == second.completion_tokens))

            # A model whose image embeddings read the prompt (InstructBLIP) keys them by image and instruction.
            instruction = blip_prompt(args.question) if info.image_embeddings_depend_on_instruction else ""
            (encoded,) = client.encode([args.image], instruction=instruction)
            print(f"4. Encode of the same image: cache_hit={encoded.cache_hit}, key {encoded.embedding_key[:16]}…, "
                  f"{encoded.num_tokens} x {encoded.hidden_size} embedding")  # fmt: skip
            checks.append(("the encoder's cache holds the image (Encode cache_hit)", encoded.cache_hit))
            local_hits = generator.metric('mmserve_image_lookups_total{source="local"}')
            prefix_hits = generator.metric("mmserve_prefix_cache_hit_tokens_total")
            print(f"  metrics: encoder cache hits {encoder.metric('mmserve_encoder_cache_hits_total'):.0f}, "
                  f"misses {encoder.metric('mmserve_encoder_cache_misses_total'):.0f}; generator image lookups served "
                  f"from its own cache {local_hits:.0f}, prefix-cache hit tokens {prefix_hits:.0f}")  # fmt: skip
            checks.append(("the generator served the repeated image from its embedding cache", local_hits >= 1))

            print("5. SIGTERM both services")
            generator_code, encoder_code = stop(generator), stop(encoder)
            print(f"  generator exited {generator_code}, encoder exited {encoder_code}")
            checks.append(("the generator drained and exited 0", generator_code == 0))
            checks.append(("the encoder drained and exited 0", encoder_code == 0))
            if generator_code or encoder_code:
                print("generator log:\n" + generator.log_tail() + "\nencoder log:\n" + encoder.log_tail())

    print()
    for description, passed in checks:
        print(f"  [{'ok' if passed else 'FAILED'}] {description}")
    failed = [description for description, passed in checks if not passed]
    print("demo finished: every check passed" if not failed else f"demo FAILED: {len(failed)} check(s) did not pass")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="checkpoint directory of any supported family")
    parser.add_argument("--image", type=Path, default=REPO / "examples" / "cat.jpg", help="image to ask about")
    parser.add_argument("--question", default="What is in the picture?", help="question about the image")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per answer")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except RuntimeError as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
