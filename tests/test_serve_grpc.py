"""The server's gRPC service (KServe V2 / Triton ``inference.GRPCInferenceService``), its
model configuration and statistics (HTTP and gRPC), driven with ``tritonclient.grpc`` and
Triton's ``perf_analyzer``, the way users drive them."""

from __future__ import annotations

import math
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from randkit.errors import UserError
from randkit.serve.run import check_grpc_installed, check_settings
from randkit.serve.server import ServerSettings
from randkit.serve.tensors import array_from_bytes
from randkit.streams import Streams
from serve_support import RunningServer, measure_with_perf_analyzer, running_server, v2_body

TOKEN = "grpc-secret-token"


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    return Streams(seed).numpy("noise", test=n).random((n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def server(serve_repository: Path) -> Iterator[RunningServer]:
    with running_server(serve_repository, grpc=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[tgrpc.InferenceServerClient]:
    assert server.grpc_url is not None
    with tgrpc.InferenceServerClient(server.grpc_url) as triton:
        yield triton


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    assert server.grpc_url is not None
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _infer_input(x: np.ndarray) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _refusal(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# -- health, metadata, config ----------------------------------------------------------------------


def test_health_and_metadata(client: tgrpc.InferenceServerClient):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "2")
    assert not client.is_model_ready("no-such-model")
    assert client.get_server_metadata().name == "randkit"
    metadata = client.get_model_metadata("digits", as_json=True)
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
    ]
    assert {o["name"] for o in metadata["outputs"]} >= {"probabilities", "predicted", "class"}


def test_model_config_over_grpc_and_http(
    server: RunningServer, client: tgrpc.InferenceServerClient
):
    config = client.get_model_config("digits").config
    assert config.name == "digits" and config.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", tgrpc.model_config_pb2.TYPE_FP32, [1, 8, 8])
    ]
    assert [o.name for o in config.output][:2] == ["probabilities", "predicted"]
    assert list(config.output[0].dims) == [10]
    with server.client() as http:
        body = http.get("/v2/models/digits/versions/canary/config").json()
    assert body["max_batch_size"] == 64 and body["input"][0]["dims"] == [1, 8, 8]
    assert body["input"][0]["data_type"] == "TYPE_FP32"
    assert body["parameters"]["classes"]["string_value"].split(",") == [str(i) for i in range(10)]


# -- inference -------------------------------------------------------------------------------------


def test_raw_input_infer_replays_the_same_request_over_http(
    server: RunningServer, client: tgrpc.InferenceServerClient
):
    x = _inputs(3)
    params = {"mode": "mc_dropout", "seed": 7, "samples": 8}
    result = client.infer(
        "digits", [_infer_input(x)], model_version="1", parameters=params, request_id="abc"
    )
    response = result.get_response()
    assert response.id == "abc" and response.model_version == "1"
    echoed = response.parameters
    assert echoed["seed"].int64_param == 7 and echoed["mode"].string_param == "mc_dropout"
    assert echoed["samples"].int64_param == 8 and echoed["routed"].bool_param is False
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 10) and probabilities.dtype == np.float32
    assert result.as_numpy("class").tolist() == [
        str(p).encode() for p in result.as_numpy("predicted")
    ]
    with server.client() as http:
        body = http.post("/v2/models/digits/versions/1/infer", json=v2_body(x, **params)).json()
    over_http = {o["name"]: o["data"] for o in body["outputs"]}
    np.testing.assert_array_equal(
        np.asarray(over_http["probabilities"], dtype=np.float32).reshape(3, 10), probabilities
    )


def test_typed_contents_give_what_raw_contents_give(
    client: tgrpc.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
):
    x = _inputs(2, seed=1)
    request = pb.ModelInferRequest(model_name="digits", model_version="2", id="typed")
    request.parameters["mode"].string_param = "none"
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    response = stub.ModelInfer(request)
    names = [o.name for o in response.outputs]
    assert response.id == "typed" and names[:2] == ["probabilities", "predicted"]
    index = names.index("probabilities")
    typed = array_from_bytes("FP32", [2, 10], response.raw_output_contents[index], "out")
    raw = client.infer("digits", [_infer_input(x)], model_version="2", parameters={"mode": "none"})
    np.testing.assert_array_equal(typed, raw.as_numpy("probabilities"))


def test_requested_outputs_only(client: tgrpc.InferenceServerClient):
    wanted = [tgrpc.InferRequestedOutput("predicted")]
    result = client.infer("digits", [_infer_input(_inputs(2))], outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["predicted"]
    error = _refusal(
        lambda: client.infer(
            "digits", [_infer_input(_inputs(1))], outputs=[tgrpc.InferRequestedOutput("logits")]
        )
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "outputs" in error.message()


def test_canary_split_routes_requests_without_a_version(client: tgrpc.InferenceServerClient):
    x = _infer_input(_inputs(1))
    versions = []
    for _ in range(200):
        response = client.infer("digits", [x], parameters={"mode": "none"}).get_response()
        assert response.parameters["routed"].bool_param is True
        versions.append(response.model_version)
    canary = versions.count("2")
    assert versions.count("1") + canary == 200
    assert 5 <= canary <= 40  # 90/10: 20 expected, sd 4.2


def test_sticky_key_metadata_routes_like_the_http_header(serve_repository: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(serve_repository, repo)
    policy = repo / "digits" / "policy.yaml"
    policy.write_text(
        policy.read_text().replace("90, canary: 10}", "50, canary: 50}") + "sticky: true\n"
    )
    x = _inputs(1)
    versions: dict[str, set[str]] = {}
    with running_server(repo, grpc=True) as srv, srv.client() as http:
        assert srv.grpc_url is not None
        with tgrpc.InferenceServerClient(srv.grpc_url) as triton:
            for i in range(60):
                key = f"user-{i % 20}"
                result = triton.infer(
                    "digits",
                    [_infer_input(x)],
                    headers={"x-request-key": key},
                    parameters={"mode": "none"},
                )
                versions.setdefault(key, set()).add(result.get_response().model_version)
                if i < 20:
                    body = http.post(
                        "/v2/models/digits/infer",
                        json=v2_body(x, mode="none"),
                        headers={"X-Request-Key": key},
                    ).json()
                    versions[key].add(body["model_version"])
    assert all(len(v) == 1 for v in versions.values())  # per key: one version, both protocols
    assert set().union(*versions.values()) == {"1", "2"}


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "datatype", "params", "field"),
    [
        ([2, 1, 8, 7], "FP32", {}, "inputs.0"),
        ([2, 1, 8, 8], "INT64", {}, "inputs.0.datatype"),
        ([2, 1, 8, 8], "FP32", {"samples": "many"}, "parameters.samples"),
        ([2, 1, 8, 8], "FP32", {"colour": 3}, "parameters.colour"),
        ([2, 1, 8, 8], "FP32", {"mode": "magic"}, "parameters.mode"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    client: tgrpc.InferenceServerClient, shape, datatype, params, field
):
    dtype = np.float32 if datatype == "FP32" else np.int64
    tensor = tgrpc.InferInput("input", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    error = _refusal(lambda: client.infer("digits", [tensor], parameters=params))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith(field) and "\n" not in error.message()


def test_malformed_tensors_are_invalid_argument(stub: service_pb2_grpc.GRPCInferenceServiceStub):
    def refused(request: pb.ModelInferRequest) -> str:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return str(info.value.details())

    short = pb.ModelInferRequest(model_name="digits")
    short.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    short.raw_input_contents.append(b"\0" * 100)
    assert refused(short).startswith("inputs.0: binary data holds 100 bytes")
    nan = pb.ModelInferRequest(model_name="digits")
    nan.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    nan.inputs[0].contents.fp32_contents.extend([math.nan] * 64)
    assert "NaN" in refused(nan)
    few = pb.ModelInferRequest(model_name="digits")
    few.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    few.inputs[0].contents.fp32_contents.extend([0.0] * 3)
    assert refused(few).startswith("inputs.0.contents.fp32_contents: holds 3 values")
    named = pb.ModelInferRequest(model_name="digits")
    named.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    assert refused(named).startswith("inputs.0.name")


def test_unknown_model_or_version_is_not_found(client: tgrpc.InferenceServerClient):
    x = [_infer_input(_inputs(1))]
    for call in (
        lambda: client.infer("no-such-model", x),
        lambda: client.infer("digits", x, model_version="9"),
        lambda: client.get_model_metadata("no-such-model"),
        lambda: client.get_model_config("digits", "9"),
        lambda: client.get_inference_statistics("no-such-model"),
    ):
        error = _refusal(call)
        assert error.status() == "StatusCode.NOT_FOUND", error.message()


def test_token_is_required_except_for_health(serve_repository: Path):
    with running_server(serve_repository, grpc=True, token=TOKEN) as srv:
        assert srv.grpc_url is not None
        with tgrpc.InferenceServerClient(srv.grpc_url) as triton:
            assert triton.is_server_live() and triton.is_server_ready()
            error = _refusal(lambda: triton.get_model_metadata("digits"))
            assert error.status() == "StatusCode.UNAUTHENTICATED"
            x = [_infer_input(_inputs(1))]
            error = _refusal(lambda: triton.infer("digits", x, headers={"authorization": "x"}))
            assert error.status() == "StatusCode.UNAUTHENTICATED"
            good = {"authorization": f"Bearer {TOKEN}"}
            assert triton.infer("digits", x, headers=good).as_numpy("predicted").shape == (1,)


def test_repository_index_unload_and_load(client: tgrpc.InferenceServerClient):
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "digits", "version": "1", "state": "READY"} in [
        {k: e.get(k) for k in ("name", "version", "state")} for e in index
    ]
    client.unload_model("digits-ensemble")
    assert not client.is_model_ready("digits-ensemble")
    client.load_model("digits-ensemble")
    assert client.is_model_ready("digits-ensemble")
    error = _refusal(lambda: client.load_model("no-such-model"))
    assert error.status() == "StatusCode.NOT_FOUND"


def test_a_message_over_the_body_limit_is_resource_exhausted(serve_repository: Path):
    with running_server(serve_repository, grpc=True, max_body_mb=0.001) as srv:
        assert srv.grpc_url is not None
        with tgrpc.InferenceServerClient(srv.grpc_url) as triton:
            error = _refusal(lambda: triton.infer("digits", [_infer_input(_inputs(8))]))
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert triton.infer("digits", [_infer_input(_inputs(1))]).as_numpy("predicted").size


# -- statistics and metrics ------------------------------------------------------------------------


def _stats(client: tgrpc.InferenceServerClient, version: str) -> Any:
    (stats,) = client.get_inference_statistics("digits", version).model_stats
    return stats


def test_statistics_count_requests_batches_and_failures(
    server: RunningServer, client: tgrpc.InferenceServerClient
):
    before = _stats(client, "1")
    x = [_infer_input(_inputs(4))]
    for _ in range(3):
        client.infer("digits", x, model_version="1", parameters={"mode": "none"})
    bad = tgrpc.InferInput("input", [1, 1, 8, 8], "FP32")
    bad.set_data_from_numpy(np.full((1, 1, 8, 8), np.inf, dtype=np.float32))
    _refusal(lambda: client.infer("digits", [bad], model_version="1"))
    after = _stats(client, "1")
    assert after.inference_count - before.inference_count == 12
    assert after.execution_count - before.execution_count >= 1
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == 3 and s1.success.ns > s0.success.ns
    assert s1.fail.count - s0.fail.count == 1
    assert s1.queue.count - s0.queue.count == 3
    assert s1.compute_infer.count - s0.compute_infer.count == 3
    assert after.last_inference > 0
    with server.client() as http:
        body = http.get("/v2/models/digits/versions/1/stats").json()
        everything = http.get("/v2/models/digits/stats").json()
        metrics = http.get("/metrics").text
    (entry,) = body["model_stats"]
    assert entry["inference_count"] >= after.inference_count
    assert isinstance(entry["inference_stats"]["success"]["ns"], int)
    assert [e["version"] for e in everything["model_stats"]] == ["1", "2"]
    assert re.search(r'randkit_requests_total\{[^}]*protocol="grpc"[^}]*status="200"', metrics)
    assert re.search(r'randkit_requests_total\{[^}]*protocol="grpc"[^}]*status="400"', metrics)


def test_grpc_port_setting_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(UserError, match="--grpc-port"):
        check_settings(ServerSettings(repository=tmp_path, grpc_port=70000))
    with pytest.raises(UserError, match="--grpc-port"):
        check_settings(ServerSettings(repository=tmp_path, port=9000, grpc_port=9000))
    check_grpc_installed(ServerSettings(repository=tmp_path, grpc_port=0))
    monkeypatch.delitem(sys.modules, "randkit.serve.grpc_service")
    monkeypatch.setitem(sys.modules, "grpc", None)  # as if grpcio were not installed
    with pytest.raises(UserError, match=r"^--grpc-port: .*grpc.*pip install 'randkit\[serve\]'"):
        check_grpc_installed(ServerSettings(repository=tmp_path, grpc_port=0))


def _batch_requests(server: RunningServer) -> tuple[float, float]:
    """``randkit_batch_requests`` of digits version 1: (requests, batches) so far."""
    with server.client() as http:
        text = http.get("/metrics").text
    prefix = 'randkit_batch_requests_{}{{model="digits",version="1"}} '
    values = {part: 0.0 for part in ("sum", "count")}  # no series before the first batch
    for line in text.splitlines():
        for part in values:
            if line.startswith(prefix.format(part)):
                values[part] = float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


def test_concurrent_calls_on_one_channel_share_batches(
    server: RunningServer, stub: service_pb2_grpc.GRPCInferenceServiceStub
):
    """gRPC takes calls in on its own thread while the server's loop computes, so calls in
    flight together meet in the batcher (on the server's loop, they reached it one by one)."""
    requests = []
    for i in range(96):
        request = pb.ModelInferRequest(model_name="digits", model_version="1")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
        request.raw_input_contents.append(_inputs(1, seed=i).tobytes())
        request.parameters["mode"].string_param = "mc_dropout"
        request.parameters["samples"].int64_param = 16
        requests.append(request)
    before = _batch_requests(server)
    for start in range(0, 96, 32):  # 32 calls in flight at a time
        calls = [stub.ModelInfer.future(r, timeout=60) for r in requests[start : start + 32]]
        assert all(len(call.result().raw_output_contents) > 0 for call in calls)
    after = _batch_requests(server)
    answered, batches = after[0] - before[0], after[1] - before[1]
    assert answered == 96
    assert answered / batches >= 2, f"{batches} batches for 96 requests"


# -- Triton's perf_analyzer ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_measures_the_server(server: RunningServer, protocol: str):
    url = server.url.removeprefix("http://") if protocol == "http" else server.grpc_url
    measure_with_perf_analyzer(str(url), protocol)
