"""``randkit serve --workers 2`` for real: two worker processes behind one HTTP port and one
gRPC port, answering with seeds that never repeat between them, one ledger, metrics and
Triton statistics summed over both, a killed worker replaced, and a graceful stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from ledger_support import FEEDBACK, INFER, Process, label_of, serve_process, x_of
from randkit.errors import UserError
from randkit.serve.run import check_settings
from randkit.serve.server import ServerSettings
from randkit.streams import Streams
from serve_support import free_port, measure_with_perf_analyzer, v2_body

pytestmark = pytest.mark.slow  # two servers' worth of start-up (torch and the models, twice)
SEED = 5  # the server's --seed


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == supervisor and b"spawn_main" in command:
            pids.append(int(entry.name))
    return sorted(pids)


@pytest.fixture(scope="module")
def workers(serve_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    repo = tmp_path_factory.mktemp("workers") / "repo"
    shutil.copytree(serve_repository, repo, ignore=shutil.ignore_patterns(".randkit"))
    grpc_port = free_port()
    args = ("--workers", "2", "--grpc-port", str(grpc_port), "--seed", str(SEED))
    with serve_process(repo, *args) as server:
        server.grpc_url = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
        wait_for_both_workers(server.url)
        yield server
    assert server.popen.returncode == 0, server.log.read_text()[-2000:]  # a graceful stop
    assert worker_pids(server.popen.pid) == []


def wait_for_both_workers(url: str, seconds: float = 120) -> None:
    """Until both workers answer (``serve_process`` waits for one: the other may still be
    loading its models, and until then the first takes every connection)."""
    deadline, seen = time.monotonic() + seconds, set()
    while seen != {0, 1}:
        assert time.monotonic() < deadline, f"only worker(s) {seen} answered"
        seen |= {n % 2 for n in request_numbers(infer_on_fresh_connections(url, 8, start=0))}


def infer_on_fresh_connections(url: str, count: int, start: int) -> list[dict[str, Any]]:
    """Unseeded MC-dropout requests, each on a new connection (the kernel hands each
    connection to one worker)."""

    def one(i: int) -> dict[str, Any]:
        body = v2_body(x_of(i), mode="mc_dropout", samples=4)
        response = httpx.post(url + INFER, json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(start, start + count)))


_NUMBER_OF_SEED: dict[int, int] = {}  # grown as the tests' request numbers grow


def request_numbers(answers: list[dict[str, Any]]) -> list[int]:
    """Each answer's request number, found from its seed (the ``deploy`` stream's seed at
    ``request=n``; perf_analyzer's thousands of requests push the numbers up)."""
    seeds = [a["parameters"]["seed"] for a in answers]
    while any(seed not in _NUMBER_OF_SEED for seed in seeds):
        assert len(_NUMBER_OF_SEED) < 10**6, "a seed of no request number below a million"
        start = len(_NUMBER_OF_SEED)
        for n in range(start, start + 10_000):
            _NUMBER_OF_SEED[Streams(SEED).seed("deploy", request=n)] = n
    return [_NUMBER_OF_SEED[seed] for seed in seeds]


def test_two_workers_answer_with_seeds_that_never_repeat(workers: Process) -> None:
    assert len(worker_pids(workers.popen.pid)) == 2
    answers = infer_on_fresh_connections(workers.url, 120, start=0)
    numbers = request_numbers(answers)
    assert len(set(numbers)) == 120  # no seed given twice
    # Worker 0 numbers its requests 0, 2, 4, ..., worker 1 1, 3, 5, ...: both answered.
    assert {n % 2 for n in numbers} == {0, 1}
    ids = [a["id"] for a in answers]
    assert len(set(ids)) == 120


def test_feedback_metrics_and_statistics_cover_both_workers(workers: Process) -> None:
    before = _metric(workers.url, 'randkit_requests_total{model="digits",protocol="v2"')
    answers = infer_on_fresh_connections(workers.url, 60, start=1000)
    for answer in answers:  # on new connections: often another worker than the one that answered
        feedback = {"id": answer["id"], "label": label_of(answer)}
        response = httpx.post(workers.url + FEEDBACK, json=feedback, timeout=60)
        assert response.status_code == 200, response.text
    after = _metric(workers.url, 'randkit_requests_total{model="digits",protocol="v2"')
    assert after - before == 60  # every worker's count, summed
    labelled = httpx.get(workers.url + "/v2/models/digits/experiment").json()["versions"]
    assert sum(row["labelled"] for row in labelled) >= 60
    deadline = time.monotonic() + 10
    while True:  # a sibling's statistics are at most a quarter of a second old
        stats = httpx.get(workers.url + "/v2/models/digits/stats").json()["model_stats"]
        counted = sum(entry["inference_count"] for entry in stats)
        if counted == after or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counted == after


def test_grpc_port_is_served_by_the_workers_and_reloads_are_refused(workers: Process) -> None:
    x = np.asarray(x_of(3), dtype=np.float32)
    for _ in range(4):  # a channel each: each talks to one worker
        client = tgrpc.InferenceServerClient(workers.grpc_url)  # type: ignore[attr-defined]
        tensor = tgrpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer("digits", [tensor], parameters={"seed": 11})
        assert answer.as_numpy("predicted").shape == (1,)
        with pytest.raises(InferenceServerException, match="--workers 2"):
            client.load_model("digits")
        client.close()
    response = httpx.post(workers.url + "/v2/repository/models/digits/unload")
    assert response.status_code == 409
    assert "unload needs a server of one process" in response.json()["error"]


def test_perf_analyzer_reads_both_workers_statistics(workers: Process) -> None:
    """perf_analyzer reads the statistics before and after each window: the server's count
    must follow the requests it sent, whichever worker answers the statistics request."""
    output = measure_with_perf_analyzer(workers.url.removeprefix("http://"), "http")
    sent = int(re.findall(r"Client:\s+Request count: (\d+)", output)[-1])
    counted = int(re.findall(r"Server:\s+Inference count: (\d+)", output)[-1])
    assert abs(counted - sent) <= 0.1 * sent, output[-2000:]  # siblings' counts lag 0.25 s


def test_a_killed_worker_is_replaced(workers: Process) -> None:
    victim = worker_pids(workers.popen.pid)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = worker_pids(workers.popen.pid)
        if len(pids) == 2 and victim not in pids:
            break
        time.sleep(0.2)
    assert len(pids) == 2 and victim not in pids
    wait_for_both_workers(workers.url)  # the replacement serves
    answers = infer_on_fresh_connections(workers.url, 40, start=2000)
    assert len({a["id"] for a in answers}) == 40


def test_workers_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--workers: must be in \[1, 64\], got 0"):
        check_settings(ServerSettings(repository=tmp_path, workers=0))
    with pytest.raises(UserError, match="--grpc-port: give a port, not 0, with --workers"):
        check_settings(ServerSettings(repository=tmp_path, workers=2, grpc_port=0))


def _metric(url: str, prefix: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )
