"""The reward server and `RemoteReward`, end to end on loopback (real sockets, real HTTP, no mocks)."""

import base64
import http.client
import json
import socket
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_nft.rewards import RemoteReward, RemoteRewardError
from trl_nft.rewards.server import RequestError, RewardServer, ServerLimits, encode_images, parse_score_request


TOKEN = "s3cret-token"


def contrast(prompts, images, weight, log_metric, **kwargs):
    """A reward that reads pixels, a column and logs a metric: scores must match in-process and served."""
    log_metric("contrast/calls", 1.0)
    values = images.float().flatten(1).std(dim=1) * torch.tensor(weight, dtype=torch.float32)
    return {"scores": values.tolist(), "mean_pixel": images.mean(dim=(1, 2, 3)).tolist()}


class Counting:
    """Counts the images it scores (a refused request must score none)."""

    def __init__(self, delay=0.0, result=None):
        self.calls, self.delay, self.result = 0, delay, result

    def __call__(self, prompts, images, **kwargs):
        self.calls += len(prompts)
        time.sleep(self.delay)
        return self.result if self.result is not None else [1.0] * len(prompts)


@pytest.fixture
def serve():
    servers = []

    def start(reward, token=TOKEN, **limits):
        server = RewardServer(
            reward, "127.0.0.1", 0, token=token, allow_no_auth=token is None, limits=ServerLimits(**limits)
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _images(n=5, size=16, seed=0):
    # 8-bit images: the PNG wire format is exact for them
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen).float() / 255


def _post(server, body: bytes, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    hdrs = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    hdrs.update(headers or {})
    hdrs = {k: v for k, v in hdrs.items() if v is not None}
    conn.request("POST", "/score", body=body, headers=hdrs)
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def _payload(n=2, size=8, **overrides):
    payload = {"prompts": ["p"] * n, "images": encode_images(_images(n, size))}
    payload.update(overrides)
    return json.dumps(payload).encode()


def test_served_reward_scores_exactly_as_in_process(serve):
    server = serve(contrast)
    prompts = ["a", "b", "c", "d", "e"]
    images, weight = _images(), [0.5, 1.0, 2.0, 3.0, 4.0]
    logged_local, logged_remote = [], []
    local = contrast(prompts, images, weight=weight, log_metric=lambda k, v: logged_local.append((k, v)))
    remote = RemoteReward(server.url, token=TOKEN, name="contrast")
    served = remote(
        prompts, images, weight=weight, trainer_state=None, log_metric=lambda k, v: logged_remote.append((k, v))
    )
    assert served == local  # bitwise: same floats, same extras
    # batched: 3 requests of 2 + 2 + 1 images score as the reward does on those slices
    batched = RemoteReward(server.url, token=TOKEN, batch_size=2)(prompts, images, weight=weight)
    slices = [contrast(prompts[i : i + 2], images[i : i + 2], weight[i : i + 2], lambda *a: None) for i in (0, 2, 4)]
    assert batched == {k: sum((s[k] for s in slices), []) for k in local}
    assert logged_remote == [("contrast/calls", 1.0)]
    assert server.num_scored == 10
    assert remote.health()["reward"] == "contrast"


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "Basic " + base64.b64encode(b"u:s3cret-token").decode(), TOKEN]
)
def test_missing_or_wrong_token_is_401_and_nothing_is_scored(serve, header):
    reward = Counting()
    server = serve(reward)
    status, payload = _post(server, _payload(), {"Authorization": header})
    assert status == 401 and "bearer token" in payload["error"]
    with pytest.raises(RemoteRewardError, match=rf"{server.url}/score refused the request with HTTP 401"):
        RemoteReward(server.url, token="wrong", max_retries=3, backoff=0)(["p"], _images(1))
    assert reward.calls == 0 and server.num_scored == 0


def test_token_from_environment_and_no_auth(serve, monkeypatch):
    server = serve(Counting())
    monkeypatch.setenv("TRL_NFT_REWARD_TOKEN", TOKEN)
    assert RemoteReward(server.url)(["p"], _images(1)) == [1.0]
    open_server = serve(Counting(), token=None)
    monkeypatch.delenv("TRL_NFT_REWARD_TOKEN")
    assert RemoteReward(open_server.url)(["p"], _images(1)) == [1.0]
    with pytest.raises(ValueError, match="needs a bearer token"):
        RewardServer(Counting(), "127.0.0.1", 0)


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"[1, 2]", {}, 400, "must be a JSON object"),
        (_payload(extra=1), {}, 400, "Unknown field"),
        (_payload(prompts="p"), {}, 400, "'prompts' must be a list of strings"),
        (_payload(prompts=["a"]), {}, 422, "'images' has 2 entries but 'prompts' has 1"),
        (_payload(images=["!!", "??"]), {}, 422, "images[0] is not valid base64"),
        (_payload(images=[base64.b64encode(b"GIF89a....").decode()] * 2), {}, 422, "is not a PNG"),
        (_payload(columns={"tag": ["x"]}), {}, 422, "Column 'tag' has 1 values"),
        (_payload(columns={"images": ["x", "y"]}), {}, 422, "name of a reward argument"),
        (_payload(prompts=[], images=[]), {}, 422, "Empty batch"),
        (_payload(), {"Content-Type": "text/plain"}, 415, "application/json"),
        (_payload(n=5), {}, 413, "exceeds the server's max_batch_size of 4"),
    ],
)
def test_malformed_or_wrong_shape_requests_are_4xx_with_a_message(serve, body, headers, status, message):
    reward = Counting()
    server = serve(reward, max_batch_size=4)
    got, payload = _post(server, body, headers)
    assert got == status and message in payload["error"]
    assert reward.calls == 0


def test_mixed_sizes_oversized_body_and_huge_images_are_refused(serve):
    reward = Counting()
    server = serve(reward, max_request_bytes=20_000, max_image_pixels=32 * 32)
    mixed = {"prompts": ["a", "b"], "images": encode_images(_images(1, 8)) + encode_images(_images(1, 16))}
    status, payload = _post(server, json.dumps(mixed).encode())
    assert status == 422 and "share one size" in payload["error"]
    status, payload = _post(server, _payload(n=1, size=64))
    assert status == 413 and "64x64 pixels" in payload["error"]
    status, payload = _post(server, b"x" * 30_000)
    assert status == 413 and "exceeds the server's limit of 20000" in payload["error"]
    # a lying Content-Length is refused before anything is read
    status, payload = _post(server, b"{}", {"Content-Length": str(10**9)})
    assert status == 413
    assert reward.calls == 0


def test_reward_failures_and_slow_scoring_are_5xx(serve):
    server = serve(Counting(result=[1.0]))  # wrong length for 2 images
    status, payload = _post(server, _payload())
    assert status == 500 and "returned 1 scores for 2 images" in payload["error"]
    slow = serve(Counting(delay=1.0), score_timeout=0.2)
    status, payload = _post(slow, _payload())
    assert status == 504 and "longer than the server's limit of 0.2 s" in payload["error"]


def test_server_down_or_slow_retries_then_fails_naming_the_url(serve):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=rf"Reward server {url}/score did not answer after 3 attempts"):
        RemoteReward(url, token=TOKEN, max_retries=2, backoff=0.05)(["p"], _images(1))
    assert time.perf_counter() - start >= 0.05 + 0.1  # it waited between attempts (backoff 0.05, 0.1)

    slow = Counting(delay=0.5)
    server = serve(slow)
    with pytest.raises(RemoteRewardError, match=r"did not answer after 2 attempts \(last: .*timed out"):
        RemoteReward(server.url, token=TOKEN, timeout=0.1, max_retries=1, backoff=0)(["p"], _images(1))


def test_non_finite_scores_travel_and_are_caught_by_the_trainer_boundary(serve):
    from trl_nft.rewards.calling import RewardCaller

    server = serve(Counting(result=[float("inf"), None, 1.0]))
    remote = RemoteReward(server.url, token=TOKEN, name="judge")
    assert remote(["a", "b", "c"], _images(3))[1:] == [None, 1.0]
    caller = RewardCaller([remote], ["judge"])
    with pytest.raises(ValueError, match=r"'judge' returned 1 non-finite score"):
        caller(["a", "b", "c"], _images(3), trainer_state=None, log_metric=None)


def test_columns_that_are_not_json_are_refused_client_side():
    with pytest.raises(TypeError, match=r"Column 'blob' cannot be sent to the reward server"):
        RemoteReward("http://127.0.0.1:1", token=TOKEN)(["p"], _images(1), blob=[object()])


def test_cli_refuses_to_serve_without_a_token(monkeypatch, capsys):
    from trl_nft.cli import main

    monkeypatch.delenv("TRL_NFT_REWARD_TOKEN", raising=False)
    assert main(["serve-reward", "brightness", "--port", "0"]) == 2
    assert "needs a bearer token" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- fuzzing
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_png = st.builds(lambda n: encode_images(_images(1, n))[0], st.integers(1, 4))
_requests = st.fixed_dictionaries(
    {},
    optional={
        "prompts": st.lists(st.text(max_size=5), max_size=3) | _json,
        "images": st.lists(_png | st.text(max_size=12) | _json, max_size=3) | _json,
        "columns": st.dictionaries(st.text(max_size=6), st.lists(_json, max_size=3) | _json, max_size=2) | _json,
        "junk": _json,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(st.binary(max_size=200), _requests.map(lambda d: json.dumps(d).encode())))
def test_request_parser_fuzz_never_crashes(body):
    limits = ServerLimits(max_batch_size=2, max_image_pixels=9)
    try:
        prompts, images, columns = parse_score_request(body, limits)
    except RequestError as err:
        assert 400 <= err.status < 500 and err.message
    else:
        assert images.shape[0] == len(prompts) <= 2 and images.shape[1] == 3
        assert all(len(v) == len(prompts) for v in columns.values())


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=8, max_size=64))
def test_image_decoder_fuzz_on_png_prefixed_garbage(data):
    body = json.dumps({"prompts": ["p"], "images": [base64.b64encode(b"\x89PNG\r\n\x1a\n" + data).decode()]}).encode()
    with pytest.raises(RequestError) as err:
        parse_score_request(body, ServerLimits())
    assert err.value.status in (413, 422)


def test_png_round_trip_is_exact_for_8_bit_images():
    from trl_nft.rewards.server import decode_image

    images = _images(2, 8)
    decoded = [decode_image(s, i, 64) for i, s in enumerate(encode_images(images))]
    back = torch.stack([torch.from_numpy(a) for a in decoded]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(back, images)
