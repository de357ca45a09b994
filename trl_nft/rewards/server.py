"""Serve any reward over HTTP, with a JSON protocol that never executes code on load.

    trl-nft serve-reward SPEC [--host 127.0.0.1] [--port 8000] [--token T | --no-auth]

`SPEC` is a built-in reward name or a dotted path `module:function` (see `trl_nft.rewards.resolve_reward`). The
trainer side is `trl_nft.rewards.RemoteReward`. The protocol (version 1, documented in docs/rewards.md):

* `GET /health` -> 200 `{"status": "ok", "protocol": 1, "reward": NAME, "max_batch_size": ..., "max_request_bytes": ...}`
  (no token needed; it scores nothing).
* `POST /score` with `Authorization: Bearer TOKEN`, `Content-Type: application/json` and a `Content-Length`, body
  `{"prompts": [str] * N, "images": [base64 PNG] * N, "columns": {name: [JSON value] * N}}` (`columns` optional;
  images 8-bit RGB PNGs of one size) -> 200 `{"scores": [float | null | "nan" | "inf" | "-inf"] * N,
  "extras": {key: [...] * N}, "metrics": {name: float}}`. Non-finite floats travel as strings (JSON has none); the
  trainer's reward boundary then treats them as it treats any non-finite score.
* Errors: `{"error": MESSAGE}` with 400 (malformed JSON or fields), 401 (missing or wrong token, checked before the
  body is read: nothing is scored), 404, 411 (no Content-Length), 413 (body, batch or image too large), 415 (not
  JSON), 422 (well-formed but unusable: length mismatch, bad PNG, mixed sizes, a reserved column name), 500 (the
  reward raised or returned a malformed value), 503 (busy longer than the time limit), 504 (scoring took longer than
  the time limit).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import inspect
import io
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from .calling import RESERVED_REWARD_KWARGS, parse_reward_output, reward_name


PROTOCOL_VERSION = 1
TOKEN_ENV = "TRL_NFT_REWARD_TOKEN"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class ServerLimits:
    """Limits of a reward server; each breach is answered with a 4xx/5xx and a message.

    Args:
        max_request_bytes (`int`, defaults to 64 MiB): largest `POST /score` body (413 above).
        max_batch_size (`int`, defaults to 64): most images per request (413 above); `RemoteReward` splits larger
            batches.
        max_image_pixels (`int`, defaults to 4096 * 4096): most pixels per image, checked from the PNG header before
            decoding (413 above; no decompression bombs).
        score_timeout (`float`, defaults to 300): seconds a request may wait for and spend in the reward (504 above,
            503 when still queued).
        read_timeout (`float`, defaults to 60): seconds a connection may stay silent while sending its request
            (the connection is closed after).
    """

    max_request_bytes: int = 64 * 1024 * 1024
    max_batch_size: int = 64
    max_image_pixels: int = 4096 * 4096
    score_timeout: float = 300.0
    read_timeout: float = 60.0


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = int(status), message


# ------------------------------------------------------------------------------------------------------------ protocol
def encode_images(images: torch.Tensor) -> list[str]:
    """`[N, 3, H, W]` floats in [0, 1] -> N base64 PNG strings (8-bit RGB, values rounded to the nearest 1/255)."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [N, 3, H, W] tensor, got shape {tuple(images.shape)}.")
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image in array:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=1)
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def decode_image(data: str, index: int, max_pixels: int) -> np.ndarray:
    """One base64 PNG -> `[H, W, 3]` uint8, refusing anything that is not a PNG of at most `max_pixels` pixels."""
    from PIL import Image

    if not isinstance(data, str):
        raise RequestError(400, f"images[{index}] must be a base64 string, got {type(data).__name__}.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(422, f"images[{index}] is not valid base64: {err}.") from None
    if not raw.startswith(_PNG_MAGIC):
        raise RequestError(422, f"images[{index}] is not a PNG (the protocol sends images as base64 PNG).")
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(
                413, f"images[{index}] has {width}x{height} pixels, more than the server's limit of {max_pixels}."
            )
        image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)
    except RequestError:
        raise
    except Exception as err:  # any decoder failure on untrusted bytes is the client's malformed image
        raise RequestError(422, f"images[{index}] is not a readable PNG: {type(err).__name__}: {err}.") from None


def parse_score_request(body: bytes, limits: ServerLimits) -> tuple[list[str], torch.Tensor, dict[str, list]]:
    """Parse and check a `POST /score` body: `(prompts, images [N, 3, H, W] float32 in [0, 1], columns)`.

    Raises:
        RequestError: with a 4xx status and a message naming the field, for anything malformed.
    """
    if len(body) > limits.max_request_bytes:
        raise RequestError(413, f"Request body of {len(body)} bytes exceeds the limit of {limits.max_request_bytes}.")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RequestError(400, f"Request body is not valid JSON: {err}.") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"Request body must be a JSON object, got {type(payload).__name__}.")
    unknown = sorted(set(payload) - {"prompts", "images", "columns"})
    if unknown:
        raise RequestError(400, f"Unknown field(s) {unknown}; a request has 'prompts', 'images' and 'columns'.")
    prompts, images, columns = payload.get("prompts"), payload.get("images"), payload.get("columns", {})
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, "'prompts' must be a list of strings.")
    if not isinstance(images, list):
        raise RequestError(400, "'images' must be a list of base64 PNG strings.")
    n = len(prompts)
    if len(images) != n:
        raise RequestError(
            422, f"'images' has {len(images)} entries but 'prompts' has {n}: send one image per prompt."
        )
    if n == 0:
        raise RequestError(422, "Empty batch: send at least one prompt and image.")
    if n > limits.max_batch_size:
        raise RequestError(413, f"Batch of {n} images exceeds the server's max_batch_size of {limits.max_batch_size}.")
    if not isinstance(columns, dict):
        raise RequestError(400, "'columns' must be an object mapping column names to lists.")
    for name, values in columns.items():
        if name in RESERVED_REWARD_KWARGS or name == "prompt":
            raise RequestError(422, f"Column {name!r} has the name of a reward argument; rename it.")
        if not name.isidentifier():
            raise RequestError(422, f"Column name {name!r} is not a valid Python identifier.")
        if not isinstance(values, list) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, list) else f"a {type(values).__name__}"
            raise RequestError(422, f"Column {name!r} has {got}; it must be a list with one value per image ({n}).")
    arrays = [decode_image(data, i, limits.max_image_pixels) for i, data in enumerate(images)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise RequestError(422, f"Images of one request must share one size, got {sorted(s[:2] for s in shapes)}.")
    # contiguous NCHW, as the trainer passes images: reductions then run in the same order, so scores match exactly
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float() / 255.0
    return prompts, tensor, columns


def _encode_value(value: float | None):
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def decode_value(value) -> float | None:
    """A score from a response: a number, `null`, or one of the strings `"nan"`, `"inf"`, `"-inf"`."""
    if value is None:
        return None
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a score: {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------------------ server
class RewardServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` scoring with one reward function, one request at a time (reward models are rarely
    thread-safe). Requests are parsed on their own threads; scoring runs on one worker thread.

    Args:
        reward (`Callable`): the reward function (any form `DiffusionNFTTrainer` accepts, `async def` included).
        host (`str`, defaults to `"127.0.0.1"`), port (`int`, defaults to 8000; 0 picks a free port).
        token (`str`, *optional*): the bearer token clients must send. `None` only with `allow_no_auth=True`.
        limits ([`ServerLimits`], *optional*).
        device (`str`, *optional*): where images are put before scoring; defaults to CUDA when available.
    """

    daemon_threads = True

    def __init__(
        self,
        reward: Callable,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        allow_no_auth: bool = False,
        limits: ServerLimits | None = None,
        device: str | None = None,
    ):
        if token is None and not allow_no_auth:
            raise ValueError(
                f"A reward server needs a bearer token: pass --token, set {TOKEN_ENV}, or pass --no-auth explicitly "
                "(then anyone who can reach the port can use the reward)."
            )
        if token is not None and not token:
            raise ValueError("The token must not be empty.")
        self.reward, self.name = reward, reward_name(reward)
        self.token = token.encode() if token else None
        self.limits = limits or ServerLimits()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.num_scored = 0  # images scored so far (tests read this: a refused request scores nothing)
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), self.token)

    def _score(self, prompts, images, columns) -> dict:
        metrics: dict[str, list[float]] = {}

        def log_metric(name: str, value: float):
            metrics.setdefault(str(name), []).append(float(value))

        images = images.to(self.device)
        result = self.reward(prompts=prompts, images=images, **columns, trainer_state=None, log_metric=log_metric)
        if inspect.isawaitable(result):

            async def wait():
                return await result

            result = asyncio.run(wait())
        scores, extras = parse_reward_output(result, self.name, len(prompts))
        self.num_scored += len(prompts)
        return {
            "scores": [_encode_value(v) for v in scores],
            "extras": {k: [_encode_value(v) for v in vals] for k, vals in extras.items()},
            "metrics": {k: _encode_value(sum(v) / len(v)) for k, v in metrics.items()},
        }

    def score(self, prompts, images, columns) -> dict:
        """Score on the worker thread within `score_timeout` (504 when too slow, 503 when still queued)."""
        future = self._executor.submit(self._score, prompts, images, columns)
        try:
            return future.result(timeout=self.limits.score_timeout)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise RequestError(
                    503, f"Server busy: the request waited {self.limits.score_timeout} s for the reward; retry later."
                ) from None
            raise RequestError(
                504, f"Scoring took longer than the server's limit of {self.limits.score_timeout} s."
            ) from None
        except RequestError:
            raise
        except Exception as err:
            raise RequestError(500, f"The reward {self.name!r} failed: {type(err).__name__}: {err}") from None

    def server_close(self):
        super().server_close()
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"
    server_version = "trl-nft-reward/1"

    def setup(self):
        self.timeout = self.server.limits.read_timeout
        super().setup()

    def log_message(self, format, *args):  # one line per request on stderr, as http.server does, minus the noise
        if os.environ.get("TRL_NFT_REWARD_QUIET") != "1":
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict, close: bool = False):
        body = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="trl-nft-reward"')
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str):
        # The body of a refused request is not read, so the connection cannot be reused.
        self._send(status, {"error": message}, close=True)

    def do_GET(self):
        if self.path.split("?")[0] != "/health":
            return self._error(404, f"No such endpoint {self.path!r}; use GET /health or POST /score.")
        limits = self.server.limits
        self._send(
            200,
            {
                "status": "ok",
                "protocol": PROTOCOL_VERSION,
                "reward": self.server.name,
                "max_batch_size": limits.max_batch_size,
                "max_request_bytes": limits.max_request_bytes,
            },
        )

    def do_POST(self):
        try:
            if self.path.split("?")[0] != "/score":
                raise RequestError(404, f"No such endpoint {self.path!r}; use POST /score.")
            if not self.server.authorized(self.headers.get("Authorization")):
                raise RequestError(401, "Missing or wrong bearer token (header 'Authorization: Bearer <token>').")
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise RequestError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}.")
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                raise RequestError(411, "A Content-Length header with the body's size in bytes is required.")
            length = int(length)
            if length > self.server.limits.max_request_bytes:
                raise RequestError(
                    413,
                    f"Request body of {length} bytes exceeds the server's limit of "
                    f"{self.server.limits.max_request_bytes}; send smaller batches.",
                )
            body = self.rfile.read(length)
            if len(body) != length:
                raise RequestError(400, f"Body ended after {len(body)} of {length} bytes.")
            prompts, images, columns = parse_score_request(body, self.server.limits)
            self._send(200, self.server.score(prompts, images, columns))
        except RequestError as err:
            self._error(err.status, err.message)
        except TimeoutError:
            self.close_connection = True


# ------------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-nft serve-reward",
        description="Serve a reward over HTTP (JSON + base64 PNG; see docs/rewards.md) for trl_nft.rewards.RemoteReward.",
    )
    parser.add_argument("spec", help="A built-in reward name (e.g. 'pickscore') or a dotted path 'module:function'.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: 127.0.0.1, this machine only).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default: 8000; 0 picks a free one).")
    parser.add_argument("--token", default=None, help=f"Bearer token clients must send (default: ${TOKEN_ENV}).")
    parser.add_argument("--no-auth", action="store_true", help="Serve without a token (anyone reaching the port).")
    parser.add_argument(
        "--reward-kwargs", default=None, help="JSON object of keyword arguments for a built-in reward model's class."
    )
    parser.add_argument("--device", default=None, help="Device for the images (default: cuda if available, else cpu).")
    defaults = ServerLimits()
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-request-mb", type=float, default=defaults.max_request_bytes / 2**20)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--timeout", type=float, default=defaults.score_timeout, help="Seconds per request.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`trl-nft serve-reward`: serve until interrupted."""
    from . import resolve_reward

    args = build_parser().parse_args(argv)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if args.no_auth and token is not None:
        print("trl-nft serve-reward: --no-auth and a token were both given; pick one.", file=sys.stderr)
        return 2
    try:
        reward_kwargs = json.loads(args.reward_kwargs) if args.reward_kwargs else {}
    except json.JSONDecodeError as err:
        print(f"trl-nft serve-reward: --reward-kwargs is not valid JSON: {err}", file=sys.stderr)
        return 2
    if not isinstance(reward_kwargs, dict):
        print("trl-nft serve-reward: --reward-kwargs must be a JSON object.", file=sys.stderr)
        return 2
    reward = resolve_reward(args.spec, **reward_kwargs)
    limits = ServerLimits(
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_batch_size=args.max_batch_size,
        max_image_pixels=args.max_image_pixels,
        score_timeout=args.timeout,
    )
    try:
        server = RewardServer(
            reward, args.host, args.port, token=token, allow_no_auth=args.no_auth, limits=limits, device=args.device
        )
    except ValueError as err:
        print(f"trl-nft serve-reward: {err}", file=sys.stderr)
        return 2
    if args.no_auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: serving without a token on {args.host}: anyone who can reach it can use it.", file=sys.stderr)
    print(f"Serving reward {server.name!r} at {server.url} (POST /score, GET /health); Ctrl-C to stop.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
