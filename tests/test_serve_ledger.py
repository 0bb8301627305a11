"""The durable experiment ledger: UUIDv7 request ids, the ledger API under threads and on
one SQLite file shared by two connections, retention, policy epochs, and the server for
real: restarts, SIGKILL, two processes on one ledger, huge ids, a policy reload, and a
PostgreSQL server started by the test."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import run_cli
from ledger_support import (
    FEEDBACK,
    INFER,
    infer_many,
    label_of,
    postgres_url,
    send_feedback,
    serve_process,
    stored_rows,
    x_of,
)
from randkit.errors import UserError
from randkit.serve import ids
from randkit.serve.ids import uuid7, uuid7_millis
from randkit.serve.ledger import FeedbackLedger, LedgerError, Prediction
from randkit.serve.run import check_settings
from randkit.serve.server import ServerSettings
from serve_support import running_server, v2_body

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# -- request ids ------------------------------------------------------------------------------


def test_uuid7_format_order_and_time() -> None:
    before = time.time_ns() // 1_000_000
    made = [uuid7() for _ in range(10_000)]
    after = time.time_ns() // 1_000_000
    assert all(UUID7.match(value) for value in made)
    parsed = [uuid.UUID(value) for value in made]
    assert {u.version for u in parsed} == {7} and {u.variant for u in parsed} == {uuid.RFC_4122}
    assert made == sorted(made) and len(set(made)) == len(made)  # strictly increasing
    assert before <= uuid7_millis(made[0]) <= uuid7_millis(made[-1]) <= after + 1


def test_uuid7_keeps_order_when_the_clock_stands_still_or_steps_back(monkeypatch) -> None:
    now = [1_700_000_000_000_000_000]
    monkeypatch.setattr(ids.time, "time_ns", lambda: now[0])
    monkeypatch.setattr(ids, "_CLOCK", ids._Clock())
    first = [uuid7() for _ in range(5000)]  # more than the 4096 a millisecond's counter holds
    now[0] -= 10**9  # one second back
    second = [uuid7() for _ in range(10)]
    made = first + second
    assert made == sorted(made) and len(set(made)) == len(made)
    assert uuid7_millis(first[0]) == 1_700_000_000_000


def test_uuid7_of_a_forked_child_is_not_its_parents() -> None:
    uuid7()  # the parent holds buffered entropy
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.write(write, uuid7().encode())
        os._exit(0)
    os.waitpid(child, 0)
    theirs, ours = os.read(read, 64).decode(), uuid7()
    assert theirs[-17:] != ours[-17:]  # the 62 random bits differ


def test_uuid7_unique_across_threads() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        out[i].extend(uuid7() for _ in range(5000))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({v for chunk in out for v in chunk}) == 20_000
    assert all(chunk == sorted(chunk) for chunk in out)


# -- the ledger API ---------------------------------------------------------------------------


def _hammer(ledgers: list[FeedbackLedger], threads: int = 8, each: int = 300) -> None:
    """Threads record predictions and feedback through ``ledgers`` (round robin)."""

    def work(t: int) -> None:
        ledger = ledgers[t % len(ledgers)]
        for i in range(each):
            request_id = f"{t}-{i}"
            ledger.record_prediction("digits", request_id, str(1 + i % 2), i % 3, routed=True)
            ledger.record_feedback("digits", request_id, 0)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))


def _expected(threads: int, each: int) -> dict[str, tuple[int, int]]:
    out = {}
    for v in "12":
        mine = [i for i in range(each) if str(1 + i % 2) == v]
        out[v] = (threads * len(mine), threads * sum(i % 3 == 0 for i in mine))
    return out


def test_two_ledgers_on_one_sqlite_file_under_threads(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    first, second = FeedbackLedger(path), FeedbackLedger(path)  # two connections, like 2 servers
    try:
        _hammer([first, second])
        assert first.counts("digits") == second.counts("digits") == _expected(8, 300)
        assert first.requests("digits") == {"1": 1200, "2": 1200}
        assert len(second) == 2400
    finally:
        first.close()
        second.close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_ids_name_one_prediction_all_or_none() -> None:
    with FeedbackLedger() as ledger:
        ledger.record_prediction("digits", "a", "1", predicted=2, routed=True)
        ledger.record_prediction("text", "a", "1", predicted=2, routed=True)  # other model: fine
        with pytest.raises(LedgerError) as info:
            ledger.record_prediction("digits", "a", "2", predicted=5, routed=True)
        assert info.value.status == 409 and info.value.field == "id"
        with pytest.raises(LedgerError):  # b is new, a is taken: neither is recorded
            ledger.record_predictions(
                [Prediction("digits", "b", "1", 0, True), Prediction("digits", "a", "1", 0, True)]
            )
        with pytest.raises(LedgerError) as info:
            ledger.record_feedback("digits", "b", 0)
        assert info.value.status == 404
        assert ledger.record_feedback("digits", "a", 2)["version"] == "1"  # the first one
        assert ledger.requests("digits") == {"1": 1} and ledger.counts("digits") == {"1": (1, 1)}


def test_written_behind_predictions_are_merged_and_a_collision_loses_only_its_own() -> None:
    with FeedbackLedger() as ledger:
        ledger.record_prediction("digits", "taken", "1", predicted=1, routed=True)
        started = threading.Event()

        def hold(db: Any) -> None:  # keeps the ledger thread busy while the writes queue up
            started.set()
            time.sleep(0.3)

        ledger._submit(hold, True, False)
        assert started.wait(5)
        for i in range(50):  # one group: merged into one INSERT
            rows = [Prediction("digits", f"r{i}/{j}", "2", j, True) for j in range(3)]
            ledger.record_predictions_behind(rows)
        ledger.record_predictions_behind([Prediction("digits", "taken", "2", 0, True)])
        ledger.record_predictions_behind([Prediction("digits", "last", "2", 4, True)])
        assert ledger.requests("digits") == {"1": 1, "2": 151}  # queued after them: in order
        assert ledger.record_feedback("digits", "r49/2", 2)["correct"]
        assert ledger.record_feedback("digits", "taken", 1)["version"] == "1"  # not overwritten


def test_feedback_for_a_young_server_id_waits_for_its_prediction() -> None:
    """Another replica may not have committed a prediction yet when its feedback arrives."""
    with FeedbackLedger() as ledger:
        young, label = uuid7(), 3

        async def scenario() -> dict[str, Any]:
            feedback = asyncio.create_task(ledger.record_feedback_async("digits", young, label))
            await asyncio.sleep(0.3)  # the "other replica" commits late
            ledger.record_predictions_behind([Prediction("digits", young, "1", label, True)])
            return await feedback

        assert asyncio.run(scenario())["correct"]
        with pytest.raises(LedgerError) as info:  # a client's own id is not waited for
            asyncio.run(ledger.record_feedback_async("digits", "never-made", 1))
        assert info.value.status == 404


def test_a_cancelled_request_neither_records_nor_stops_the_ledger() -> None:
    with FeedbackLedger() as ledger:
        started, release = threading.Event(), threading.Event()
        busy = ledger._submit(lambda db: started.set() or release.wait(30), True, False)
        started.wait(30)  # the ledger's thread is inside an operation

        async def cancelled() -> None:
            gone = [Prediction("digits", "gone", "1", 0, True)]
            task = asyncio.create_task(ledger.record_predictions_async(gone))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancelled())
        release.set()
        busy.result(timeout=30)
        ledger.record_prediction("digits", "next", "1", 0, routed=True)
        assert len(ledger) == 1 and ledger.requests("digits") == {"1": 1}


def test_retention_forgets_predictions_but_not_counts(tmp_path: Path) -> None:
    now = [1000.0]
    with FeedbackLedger(tmp_path / "l.sqlite", retention_days=1, clock=lambda: now[0]) as ledger:
        ledger.record_prediction("digits", "old", "1", predicted=1, routed=True)
        ledger.record_feedback("digits", "old", 1)
        now[0] += 86400 / 2
        ledger.record_prediction("digits", "young", "1", predicted=1, routed=True)
        now[0] += 86400 / 2 + 1
        assert ledger.expire() == 1 and len(ledger) == 1
        with pytest.raises(LedgerError) as info:
            ledger.record_feedback("digits", "old", 1)
        assert info.value.status == 404 and "retention" in info.value.message
        assert ledger.record_feedback("digits", "young", 0)["correct"] is False
        assert ledger.counts("digits") == {"1": (2, 1)} and ledger.requests("digits") == {"1": 2}
    with pytest.raises(ValueError, match="retention_days"):
        FeedbackLedger(retention_days=0)


def test_policy_epochs(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with FeedbackLedger(path) as ledger:
        assert ledger.open_epoch("digits", "A") == 1
        assert ledger.open_epoch("digits", "A") == 1  # a restart or reload of the same policy
        ledger.record_prediction("digits", "x", "1", predicted=0, routed=True, epoch=1)
        assert ledger.open_epoch("digits", "B") == 2
        assert ledger.counts("digits") == {} and ledger.counts("digits", 1) == {"1": (0, 0)}
        ledger.record_feedback("digits", "x", 0)  # an old epoch's feedback counts there
        assert ledger.counts("digits", 1) == {"1": (1, 1)} and ledger.counts("digits", 2) == {}
        assert ledger.open_epoch("digits", "A") == 3  # back to A is a new experiment
        assert ledger.open_epoch("text", "A") == 1
    # Replicas loading the same new policy at once agree on its epoch.
    ledgers = [FeedbackLedger(path) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            epochs = list(pool.map(lambda led: led.open_epoch("digits", "C"), ledgers))
        assert epochs == [4] * 4
    finally:
        for ledger in ledgers:
            ledger.close()


def test_acknowledged_feedback_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    with FeedbackLedger(path) as ledger:
        ledger.record_prediction("digits", "a", "1", predicted=3, routed=True)
        ledger.record_feedback("digits", "a", 3)
    with FeedbackLedger(path) as ledger:
        with pytest.raises(LedgerError) as info:
            ledger.record_feedback("digits", "a", 4)
        assert info.value.status == 409 and "label 3" in info.value.message
        assert ledger.counts("digits") == {"1": (1, 1)}


def test_serve_refuses_a_bad_ledger_in_one_line(tmp_path: Path) -> None:
    cases = [
        ({"ledger": "mysql://u@h/db"}, "unknown scheme 'mysql'"),
        ({"ledger": "postgresql://u:secret@127.0.0.1:1/"}, "name the database"),
        ({"ledger": str(tmp_path / "missing" / "l.sqlite")}, "does not exist"),
        ({"ledger": str(tmp_path)}, "is a directory"),
        ({"ledger_retention_days": 0.0}, "--ledger-retention-days"),
    ]
    for given, message in cases:
        with pytest.raises(UserError) as info:
            check_settings(ServerSettings(repository=tmp_path, **given))
        assert message in str(info.value) and "secret" not in str(info.value)
    for args, message in [
        (["--ledger", "mysql://u@h/db"], "unknown scheme"),
        (["--ledger", "postgresql://u:secret@127.0.0.1:1/db"], "cannot open"),  # nobody there
    ]:
        result = run_cli("serve", str(tmp_path), "--port", "0", *args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert message in lines[0] and "secret" not in lines[0], lines[0]


# -- the server, for real ---------------------------------------------------------------------


@pytest.fixture
def repo(serve_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the test repository, without another test's ledger."""
    copy = tmp_path / "repo"
    shutil.copytree(serve_repository, copy, ignore=shutil.ignore_patterns(".randkit"))
    return copy


def test_restart_and_sigkill_keep_ids_unique_and_feedback(repo: Path) -> None:
    with serve_process(repo) as server:
        before = infer_many(server.url, 500)
        for answer in before[:250]:
            assert send_feedback(server.url, answer, label_of(answer)).status_code == 200
    with serve_process(repo) as server:  # after a graceful restart
        after = infer_many(server.url, 500, start=500)
        for answer in before[250:]:  # old ids attach to their own predictions
            body = send_feedback(server.url, answer, label_of(answer)).json()
            assert (body["version"], body["predicted"]) == (answer["version"], answer["predicted"])
        acknowledged = []
        stop = threading.Event()

        def send() -> None:
            for answer in after:
                if stop.is_set():
                    return
                try:
                    if send_feedback(server.url, answer, label_of(answer)).status_code == 200:
                        acknowledged.append(answer)
                except httpx.TransportError:
                    return

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 120
        while len(acknowledged) < 200 and sender.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        server.popen.send_signal(signal.SIGKILL)  # while feedback is in flight
        server.popen.wait(timeout=30)
        stop.set()
        sender.join()
    answers = before + after
    assert all(UUID7.match(a["id"]) for a in answers)
    assert len({a["id"] for a in answers}) == 1000  # no id reused across restarts
    stored = stored_rows(repo)
    for answer in answers:  # every id a client was given was committed first
        assert stored[answer["id"]][:2] == (answer["version"], answer["predicted"])
    for answer in before + acknowledged:
        assert stored[answer["id"]][2] == label_of(answer)
    with serve_process(repo) as server:  # and the server comes back on the killed ledger
        again = send_feedback(server.url, acknowledged[-1], 0)
        assert again.status_code == 409 and f"label {label_of(acknowledged[-1])}" in again.text
        report = httpx.get(server.url + "/v2/models/digits/experiment").json()
    rows = report["versions"]
    assert sum(row["requests"] for row in rows) == 1000
    # A label committed just before the kill may have lost its 200: counted, not acknowledged.
    labelled = sum(label is not None for _, _, label in stored.values())
    assert sum(row["labelled"] for row in rows) == labelled >= 500 + len(acknowledged) >= 700


def test_two_server_processes_share_one_sqlite_ledger(repo: Path) -> None:
    with serve_process(repo) as one, serve_process(repo) as two:
        urls = [one.url, two.url]

        def client(k: int) -> list[dict[str, Any]]:
            made = infer_many(urls[k % 2], 100, start=1000 * k)
            for answer in made:  # feedback to the other server
                assert send_feedback(urls[(k + 1) % 2], answer, label_of(answer)).status_code == 200
            return made

        with ThreadPoolExecutor(4) as pool:
            answers = [a for made in pool.map(client, range(4)) for a in made]
        reports = [httpx.get(url + "/v2/models/digits/experiment").json() for url in urls]
    assert len({a["id"] for a in answers}) == 400
    assert reports[0]["versions"] == reports[1]["versions"]
    rows = reports[0]["versions"]
    assert sum(r["requests"] for r in rows) == sum(r["labelled"] for r in rows) == 400
    correct = sum(a["predicted"] == label_of(a) for a in answers)
    assert sum(r["correct"] for r in rows) == correct
    stored = stored_rows(repo)
    assert len(stored) == 400 and all(stored[a["id"]][2] == label_of(a) for a in answers)


def test_huge_and_reused_ids_are_refused(repo: Path) -> None:
    huge = "x" * (8 << 20)
    with running_server(repo) as srv, srv.client() as client:  # 16 MB body limit
        for path, body in [
            (INFER, {**v2_body(x_of()), "id": huge}),
            (FEEDBACK, {"id": huge, "label": 1}),
        ]:
            response = client.post(path, json=body)
            assert response.status_code == 400, response.text[:200]
            error = response.json()["error"]
            assert error.startswith("id:") and len(error) < 300
        longest = "y" * 256
        first = client.post(INFER, json={**v2_body(x_of()), "id": longest})
        assert first.status_code == 200 and first.json()["id"] == longest
        reused = client.post(INFER, json={**v2_body(x_of(1)), "id": longest})
        assert reused.status_code == 409 and reused.json()["error"].startswith("id:")
        assert client.post(FEEDBACK, json={"id": longest, "label": 1}).status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post(INFER, json=v2_body(x_of())).status_code == 200


def _routed(client: httpx.Client, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        body = client.post(INFER, json=v2_body(x_of(i))).json()
        assert body["parameters"]["routed"]
        out.append(body)
    return out


def _totals(client: httpx.Client) -> tuple[int, int, int | None]:
    report = client.get("/v2/models/digits/experiment").json()
    rows = report["versions"]
    return sum(r["requests"] for r in rows), sum(r["labelled"] for r in rows), report["epoch"]


def test_counts_restart_when_another_policy_is_loaded(repo: Path) -> None:
    with running_server(repo) as srv, srv.client() as client:
        old = _routed(client, 30)
        client.post("/v2/models/digits/versions/1/infer", json=v2_body(x_of()))  # not routed
        client.post(FEEDBACK, json={"id": old[0]["id"], "label": 1})
        assert _totals(client) == (30, 1, 1)
        assert client.post("/v2/repository/models/digits/load").status_code == 200
        assert _totals(client) == (30, 1, 1)  # the same policy: the same experiment
        policy = repo / "digits" / "policy.yaml"
        policy.write_text(policy.read_text().replace("90", "50").replace("10", "50"))
        assert client.post("/v2/repository/models/digits/load").status_code == 200
        assert _totals(client) == (0, 0, 2)
        assert client.post(FEEDBACK, json={"id": old[1]["id"], "label": 1}).status_code == 200
        _routed(client, 5)
        assert _totals(client) == (5, 0, 2)  # the old epoch's feedback is not counted here
    with running_server(repo) as srv, srv.client() as client:  # a restart continues it
        assert _totals(client) == (5, 0, 2)


def test_postgresql_ledger(repo: Path, tmp_path: Path) -> None:
    with postgres_url(tmp_path) as url:
        ledgers = [FeedbackLedger(url), FeedbackLedger(url)]
        try:
            _hammer(ledgers, threads=4, each=100)
            assert ledgers[1].counts("digits") == _expected(4, 100)
            assert ledgers[0].open_epoch("digits", "A") == 1
            with pytest.raises(LedgerError) as info:
                ledgers[0].record_prediction("digits", "0-0", "1", 0, routed=True)
            assert info.value.status == 409
        finally:
            for ledger in ledgers:
                ledger.close()
        with running_server(repo, ledger=url) as srv, srv.client() as client:
            answers = _routed(client, 20)
            for answer in answers[:10]:
                client.post(FEEDBACK, json={"id": answer["id"], "label": 1}).raise_for_status()
        assert not (repo / ".randkit").exists()  # everything went to PostgreSQL
        with running_server(repo, ledger=url) as srv, srv.client() as client:
            assert _totals(client) == (20, 10, 2)  # epoch 1 was the API's "A" above
            for answer in answers[10:]:
                body = client.post(FEEDBACK, json={"id": answer["id"], "label": 1}).json()
                assert body["version"] == answer["model_version"]
            assert _totals(client)[:2] == (20, 20)
