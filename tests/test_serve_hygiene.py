"""What operators rely on around the inference itself: short bodies dropped, every refusal
counted, per-version latency, process metrics, TF Serving's documented behaviour, and a lone
request that does not wait for a batch."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from randkit.streams import Streams
from serve_support import running_server, v2_body


def _images(n: int, seed: int = 0) -> np.ndarray:
    return Streams(seed).numpy("noise", test=n).random((n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def server(serve_repository: Path):
    # A batching window far longer than any request: a lone request must not sit in it.
    with running_server(
        serve_repository, token="secret-token", body_timeout_s=0.5, max_delay_ms=10_000
    ) as srv:
        yield srv


AUTH = {"Authorization": "Bearer secret-token"}


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _scrape(server) -> str:
    with server.client(headers=AUTH) as client:
        return client.get("/metrics").text


def _short_body(server, declared: int, sent: bytes) -> bytes:
    """Send headers declaring ``declared`` bytes, then only ``sent``; what comes back."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer secret-token\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        )
        sock.sendall(head.encode() + sent)
        received = b""
        while True:  # until the server closes the connection
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def test_a_body_shorter_than_declared_is_dropped_and_the_server_keeps_serving(server):
    before = _metric(_scrape(server), "randkit_refused_requests_total", reason="timeout")
    answers = [_short_body(server, 1000, b'{"inputs": [') for _ in range(3)]
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert b"body: incomplete after 0.5 s (12 bytes received)" in answer
    after = _metric(_scrape(server), "randkit_refused_requests_total", reason="timeout")
    assert after == before + 3
    with server.client(headers=AUTH) as client:
        response = client.post("/v2/models/digits/infer", json=v2_body(_images(1)))
    assert response.status_code == 200


def test_every_refusal_is_counted_by_reason(server):
    before = _scrape(server)
    with server.client() as client:
        assert client.post("/v2/models/digits/infer", json=v2_body(_images(1))).status_code == 401
    with server.client(headers=AUTH) as client:
        cases = [
            (client.post("/v2/models/digits/infer", content=b"{not json"), "parse"),
            (client.post("/v2/models/digits/infer", json={"inputs": []}), "validation"),
            (client.post("/v1/models/digits:predict", json={"instances": "x"}), "validation"),
            (client.post("/v2/models/nope/infer", json=v2_body(_images(1))), "not_found"),
            (client.post("/v2/models/digits/infer", content=b" " * (17 << 20)), "size"),
        ]
    after = _scrape(server)
    assert [r.status_code for r, _ in cases] == [400, 400, 400, 404, 413]
    counted = {"auth": 1, "parse": 1, "validation": 2, "not_found": 1, "size": 1}
    for reason, count in counted.items():
        grew = _metric(after, "randkit_refused_requests_total", reason=reason) - _metric(
            before, "randkit_refused_requests_total", reason=reason
        )
        assert grew == count, reason
    assert _metric(after, "randkit_refused_requests_total", reason="validation", protocol="tf") >= 1


def test_latency_and_queue_are_labelled_by_version_and_process_metrics_exist(server):
    with server.client(headers=AUTH) as client:
        for version in ("1", "2"):
            response = client.post(
                f"/v2/models/digits/versions/{version}/infer", json=v2_body(_images(1))
            )
            assert response.status_code == 200
    text = _scrape(server)
    for version in ("1", "2"):
        labels = {"model": "digits", "version": version}
        assert _metric(text, "randkit_request_latency_seconds_count", **labels) >= 1
        assert _metric(text, "randkit_queue_seconds_count", **labels) >= 1
        assert _metric(text, "randkit_batch_rows_count", **labels) >= 1
    assert _metric(text, "process_resident_memory_bytes") > 0
    assert _metric(text, "process_open_fds") > 0
    assert "python_gc_collections_total" in text


def test_a_lone_request_does_not_wait_for_the_batching_window(server):
    """The window is 10 s; a request with nothing else queued or on its way runs at once."""
    with server.client(headers=AUTH) as client:
        started = time.perf_counter()
        for _ in range(3):
            response = client.post("/v2/models/digits/versions/1/infer", json=v2_body(_images(1)))
            assert response.status_code == 200
        assert time.perf_counter() - started < 10  # three windows would be 30 s
    queue = _metric(_scrape(server), "randkit_queue_seconds_bucket", le="1.0", version="1")
    total = _metric(_scrape(server), "randkit_queue_seconds_count", version="1")
    assert queue == total  # no request of version 1 queued for a second or more


def test_tf_serving_signature_metadata_classify_and_regress(server):
    x = _images(2, seed=1)
    with server.client(headers=AUTH) as client:
        unknown = client.post(
            "/v1/models/digits:predict",
            json={"signature_name": "classify_x", "instances": x.tolist()},
        )
        named = client.post(
            "/v1/models/digits/versions/1:predict",
            json={"signature_name": "serving_default", "instances": x.tolist()},
        )
        meta = client.get("/v1/models/digits/metadata").json()
        classify = client.post(
            "/v1/models/digits/versions/1:classify",
            json={"examples": [{"input": row} for row in x.tolist()]},
        )
        wrong_feature = client.post(
            "/v1/models/digits:classify", json={"examples": [{"pixels": x[0].tolist()}]}
        )
        regress = client.post("/v1/models/digits:regress", json={"examples": [{}]})
        regress_unknown = client.post("/v1/models/nope:regress", json={"examples": [{}]})
    assert unknown.status_code == 400
    assert unknown.json()["error"].startswith("signature_name: unknown signature 'classify_x'")
    assert named.status_code == 200
    # TF Serving describes the latest version, whatever the traffic policy routes to.
    assert meta["model_spec"]["version"] == "2"
    assert classify.status_code == 200, classify.text
    result = classify.json()["result"]
    probabilities = np.array([p["probabilities"] for p in named.json()["predictions"]])
    assert [[label for label, _ in row] for row in result] == [[str(i) for i in range(10)]] * 2
    np.testing.assert_allclose([[s for _, s in row] for row in result], probabilities)
    assert wrong_feature.status_code == 400 and "examples.0" in wrong_feature.json()["error"]
    assert regress.status_code == 501 and "classifier" in regress.json()["error"]
    assert regress_unknown.status_code == 404
