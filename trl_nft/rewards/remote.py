"""`RemoteReward`: a reward scored by a `trl-nft serve-reward` server (JSON + base64 PNG over HTTP, no pickle)."""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from .server import TOKEN_ENV, decode_value, encode_images


class RemoteRewardError(RuntimeError):
    """A reward server refused a request, or did not answer after the last retry; the message names the URL."""


#: Statuses worth retrying: the server is overloaded or timed out, or a transient failure inside the reward.
_RETRY_STATUSES = (429, 500, 502, 503, 504)


class RemoteReward:
    """A reward function that sends images to a reward server (`trl-nft serve-reward`) and returns its scores.

    Usable anywhere a reward function is (`reward_funcs=[RemoteReward("http://gpu-box:8000", token=...)]`). The
    images go as 8-bit PNG (what a reward model that takes PIL images sees anyway), with the prompts and every
    dataset column (which must be JSON-serialisable). Metrics the remote reward logs with `log_metric` are logged
    here; extra per-image values it returns come back as extras.

    Args:
        url (`str`): the server's base URL, e.g. `"http://127.0.0.1:8000"`.
        token (`str`, *optional*): bearer token; defaults to the environment variable `TRL_NFT_REWARD_TOKEN`.
        name (`str`, *optional*): the name the scores are logged under (`rewards/<name>/mean`). Defaults to
            `"remote"` (several remote rewards get suffixes `remote_1`, `remote_2`; better give each a name).
        batch_size (`int`, defaults to 32): images per request.
        timeout (`float`, defaults to 300): seconds to wait for each response.
        max_retries (`int`, defaults to 3): retries after a failed attempt (connection error, timeout, 429 or 5xx);
            other 4xx answers are not retried (they would fail again).
        backoff (`float`, defaults to 1.0): the wait before retry k is `backoff * 2**k` seconds (at most 60).

    Raises (when called):
        RemoteRewardError: naming the URL and the server's message, on a refused request or after the last retry.
        TypeError: a dataset column that is not JSON-serialisable.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        name: str | None = None,
        batch_size: int = 32,
        timeout: float = 300.0,
        max_retries: int = 3,
        backoff: float = 1.0,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward url must start with http:// or https://, got {url!r}.")
        if batch_size < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(
                "RemoteReward needs batch_size >= 1, max_retries >= 0, timeout > 0 and backoff >= 0, got "
                f"{batch_size}, {max_retries}, {timeout}, {backoff}."
            )
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.name = name or "remote"
        self.batch_size, self.timeout, self.max_retries, self.backoff = batch_size, timeout, max_retries, backoff
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # Proxies from the environment apply, except to this machine: a loopback server must not be sent to a proxy.
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, name={self.name!r})"

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, body: bytes | None = None) -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.url + path
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 60.0))
            request = urllib.request.Request(url, data=body, headers=headers, method=method)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code not in _RETRY_STATUSES:
                    raise RemoteRewardError(
                        f"Reward server {url} refused the request with HTTP {err.code}: {message}"
                    ) from None
                last = f"HTTP {err.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}"
            except json.JSONDecodeError as err:
                last = f"the answer is not JSON: {err}"
        raise RemoteRewardError(
            f"Reward server {url} did not answer after {self.max_retries + 1} attempts (last: {last}). Check that "
            "`trl-nft serve-reward` runs there and is reachable, or raise `timeout` / `max_retries`."
        )

    def health(self) -> dict:
        """`GET /health` of the server (its reward name, protocol version and limits)."""
        return self._request("GET", "/health")

    # ------------------------------------------------------------------ reward
    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs):
        log_metric = kwargs.pop("log_metric", None)
        kwargs.pop("trainer_state", None)
        for key, values in kwargs.items():
            try:
                json.dumps(values[:1] if isinstance(values, list) else values)
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"Column {key!r} cannot be sent to the reward server {self.url} as JSON ({err}); drop the column "
                    "or store it as strings / numbers."
                ) from None
        scores: list[float | None] = []
        extras: dict[str, list[float | None]] = {}
        metrics: dict[str, list[float]] = {}
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            payload = {
                "prompts": list(prompts[start:stop]),
                "images": encode_images(images[start:stop]),
                "columns": {k: list(v[start:stop]) for k, v in kwargs.items()},
            }
            answer = self._request("POST", "/score", json.dumps(payload).encode())
            try:
                batch = [decode_value(v) for v in answer["scores"]]
                for key, values in answer.get("extras", {}).items():
                    extras.setdefault(key, [None] * start).extend(decode_value(v) for v in values)
                for key, value in answer.get("metrics", {}).items():
                    metrics.setdefault(key, []).append(decode_value(value))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise RemoteRewardError(f"Reward server {self.url} sent a malformed answer: {err!r}.") from None
            if len(batch) != len(payload["prompts"]):
                raise RemoteRewardError(
                    f"Reward server {self.url} sent {len(batch)} scores for {len(payload['prompts'])} images."
                )
            scores.extend(batch)
        if log_metric is not None:
            for key, values in metrics.items():
                finite = [v for v in values if v is not None and math.isfinite(v)]
                if finite:
                    log_metric(key, sum(finite) / len(finite))
        return {"scores": scores, **extras} if extras else scores


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read()).get("error", err.reason)
    except Exception:
        return str(err.reason)
