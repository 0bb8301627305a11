"""The experiment ledger: predictions awaiting feedback, their labels, and per-version counts,
kept in a database so that they survive restarts and are shared by replicas.

Storage is SQLite in WAL mode (default ``REPO/.randkit/ledger.sqlite``) or PostgreSQL (see
``ledger_db``). One thread per ledger owns the connection and runs everything in **group
commits**: whatever operations are waiting when it is free go into one transaction, each in
its own savepoint, so a busy server pays one commit for many requests and nothing blocks
the asyncio event loop or the inference thread. Guarantees:

- ``record_feedback`` returns after its transaction is committed *durably* (SQLite
  ``synchronous=FULL``, PostgreSQL synchronous commit): an acknowledged label survives a
  crash of the server and of the machine.
- ``record_predictions`` returns after its transaction is committed *without a flush*
  (SQLite ``synchronous=NORMAL`` in WAL mode, PostgreSQL ``synchronous_commit=off``): the
  rows survive a crash or SIGKILL of the server process (they are in the operating
  system's or PostgreSQL's hands), but a power loss or kernel crash within about a second
  may lose the latest ones (never corrupting the database); a later durable commit
  flushes them too. The server uses it for ids a client chose (a reused one is a 409).
- ``record_predictions_behind`` (ids the server made: UUIDv7, which cannot collide) queues
  the rows for the next group commit and returns at once, so an answer never waits for
  the database. Every operation runs in the order it was queued, so feedback sent to the
  same server after its answer always finds the prediction; feedback that reaches another
  replica first, for an id younger than ``WRITE_BEHIND_WINDOW_S``, is looked up again
  until the window ends before it is a 404. A crash of the server within milliseconds of
  an answer can lose that answer's prediction (its feedback is then a 404).
- Counts are updated in the same transaction as the rows they count.

Counts belong to a *policy epoch*: ``open_epoch(model, fingerprint)`` continues the model's
latest epoch when the fingerprint (policy and bundles) is the same, and starts the next one
otherwise, so a restart keeps an experiment going and another policy starts it afresh.
Predictions older than ``retention_days`` are deleted (their feedback is then a 404); the
counts stay. In memory the ledger holds only the operations waiting for the next commit.

>>> ledger = FeedbackLedger(":memory:")
>>> ledger.record_prediction("digits", "r1", "2", predicted=3, routed=True)
>>> ledger.record_feedback("digits", "r1", 3)["correct"]
True
>>> ledger.counts("digits")
{'2': (1, 1)}
>>> ledger.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from randkit.serve.ids import made_at
from randkit.serve.ledger_db import Database, shown_location
from randkit.serve.ledger_ops import (
    EXPIRE_CHUNK,
    LedgerError,
    Prediction,
    attach_label,
    epoch_for,
    expire_before,
    insert_prediction_parts,
    insert_predictions,
    read_counts,
    read_outcomes,
)

if TYPE_CHECKING:
    from randkit.serve.repository import ServedModel

__all__ = ["FeedbackLedger", "LedgerError", "Prediction", "policy_fingerprint"]
log = logging.getLogger("randkit.serve")
T = TypeVar("T")
MAX_GROUP = 512  # operations per group commit
# Feedback for a server-made id this young that is not found yet is looked up again (another
# replica may not have committed the prediction yet), every FEEDBACK_RETRY_S.
WRITE_BEHIND_WINDOW_S = 2.0
FEEDBACK_RETRY_S = 0.05
EXPIRE_EVERY_S = 60.0


@dataclass
class _Operation:
    run: Callable[[Database], Any]
    write: bool
    durable: bool
    future: Future[Any]
    # Written-behind predictions, one list per request: merged per group commit.
    behind: list[list[Prediction]] | None = None


def policy_fingerprint(model: ServedModel) -> str:
    """A hash of what an experiment compares: the policy and each loaded version's bundle
    (its metadata holds the weights' SHA-256), so a changed policy or bundle starts a new
    epoch while a restart or a reload of the same files continues the current one. The
    policy's ``test`` only says how the report reads the same data, so switching it keeps
    the epoch (and policies written before the field existed keep their fingerprints)."""
    state = {
        "policy": model.policy.model_dump(mode="json", exclude={"test"}),
        "versions": {v: served.bundle.meta for v, served in sorted(model.versions.items())},
    }
    text = json.dumps(state, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class FeedbackLedger:
    """Predictions, feedback and per-version counts in SQLite or PostgreSQL; thread-safe.

    ``location``: a SQLite file, ``":memory:"`` (tests), or a ``postgresql://`` URL.
    ``retention_days``: predictions older than this are deleted (None keeps them).
    """

    def __init__(
        self,
        location: str | Path = ":memory:",
        retention_days: float | None = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention_days is not None and not (
            math.isfinite(retention_days) and retention_days > 0
        ):
            raise ValueError(f"retention_days must be > 0, got {retention_days!r}")
        self.location = str(location)
        self.retention_s = None if retention_days is None else retention_days * 86400.0
        self.clock = clock
        self._database = Database(self.location)
        self._queue: queue.SimpleQueue[_Operation | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._next_expiry = 0.0
        self._opened = False  # until then a failure is the caller's error, not a warning
        self._thread = threading.Thread(target=self._serve, name="randkit-ledger", daemon=True)
        self._thread.start()
        try:
            self._call(lambda db: None, write=False)  # opens the database, or says why not
        except BaseException:
            self.close()
            raise
        self._opened = True

    # -- the ledger thread ----------------------------------------------------------------

    def _submit(
        self,
        run: Callable[[Database], T],
        write: bool,
        durable: bool,
        behind: list[list[Prediction]] | None = None,
    ) -> Future[T]:
        future: Future[T] = Future()
        if self._closed:
            future.set_exception(LedgerError(503, "ledger", "closed (the server is stopping)"))
        else:
            self._queue.put(_Operation(run, write, durable, future, behind))
        return future

    def _call(self, run: Callable[[Database], T], write: bool = True, durable: bool = False) -> T:
        return self._submit(run, write, durable).result()

    async def _await(
        self, run: Callable[[Database], T], write: bool = True, durable: bool = False
    ) -> T:
        return await asyncio.wrap_future(self._submit(run, write, durable))

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    operation = self._queue.get_nowait()
                except queue.Empty:
                    break
                if operation is None:
                    stopping = True
                    break
                group.append(operation)
            self._commit(group)
            self._expire_when_due()
        self._database.close()
        while True:  # an operation that raced close() is failed, never left hanging
            try:
                late = self._queue.get_nowait()
            except queue.Empty:
                return
            if late is not None:
                late.future.set_exception(LedgerError(503, "ledger", "closed"))

    def _commit(self, group: list[_Operation]) -> None:
        """Run ``group`` in one transaction, each operation in a savepoint: a refused one
        (``LedgerError``) is undone alone; a database failure fails them all."""
        # A caller that went away (a cancelled request) cancelled its future: skip it, and
        # no later set_result can raise on it and stop this thread.
        group = self._merge_behind([op for op in group if op.future.set_running_or_notify_cancel()])
        if not group:
            return
        outcomes: list[tuple[bool, Any]] = []
        try:
            write = any(op.write for op in group)
            self._database.begin(write, durable=any(op.durable for op in group))
            for op in group:
                self._database.rows("SAVEPOINT op")
                try:
                    outcomes.append((True, op.run(self._database)))
                    self._database.rows("RELEASE SAVEPOINT op")
                except LedgerError as exc:
                    self._database.rows("ROLLBACK TO SAVEPOINT op")
                    self._database.rows("RELEASE SAVEPOINT op")
                    outcomes.append((False, exc))
            self._database.commit()
        except Exception as exc:  # the database failed: nothing of the group took effect
            self._database.rollback()
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            where = shown_location(self.location)
            if self._opened:
                log.warning("ledger %s: %s", where, first_line)
            error = LedgerError(503, "ledger", f"{where}: {first_line}")
            for op in group:
                op.future.set_exception(error)
            return
        for op, (ok, value) in zip(group, outcomes, strict=True):
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(value)

    def _merge_behind(self, group: list[_Operation]) -> list[_Operation]:
        """Consecutive written-behind inserts as one operation: one multi-row INSERT for a
        group rather than a statement and a savepoint per request."""
        merged: list[_Operation] = []
        for op in group:
            last = merged[-1] if merged else None
            if op.behind is None or last is None or last.behind is None:
                merged.append(op)
                continue
            op.future.set_result(None)  # nobody waits for a written-behind insert
            parts = [*last.behind, *op.behind]
            run = insert_prediction_parts(parts, self.clock())
            merged[-1] = _Operation(run, True, False, last.future, parts)
        return merged

    def _expire_when_due(self) -> None:
        if self.retention_s is None or time.monotonic() < self._next_expiry:
            return
        cutoff = self.clock() - self.retention_s
        outcome: Future[int] = Future()
        self._commit([_Operation(lambda db: expire_before(db, cutoff), True, False, outcome)])
        full = outcome.exception() is None and outcome.result() == EXPIRE_CHUNK
        # A full chunk: more to delete, right after the operations now waiting.
        self._next_expiry = time.monotonic() + (0.0 if full else EXPIRE_EVERY_S)

    def __enter__(self) -> FeedbackLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Commit what is waiting, then close the database (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join()

    # -- predictions ----------------------------------------------------------------------

    def record_prediction(
        self,
        model: str,
        request_id: str,
        version: str,
        predicted: int,
        routed: bool,
        epoch: int = 0,
    ) -> None:
        """Remember one prediction so that feedback can be matched to it later."""
        self.record_predictions([Prediction(model, request_id, version, predicted, routed, epoch)])

    def record_predictions(self, predictions: Sequence[Prediction]) -> None:
        """Record one request's predictions, all or none. Raises ``LedgerError`` 409 when an
        id is already recorded for the model (ids name one prediction for good)."""
        rows = list(predictions)
        self._call(lambda db: insert_predictions(db, rows, self.clock()))

    async def record_predictions_async(self, predictions: Sequence[Prediction]) -> None:
        rows = list(predictions)
        await self._await(lambda db: insert_predictions(db, rows, self.clock()))

    def record_predictions_behind(self, predictions: Sequence[Prediction]) -> None:
        """Queue predictions whose ids the server made (UUIDv7) for the next group commit and
        return at once (see the module's guarantees). A database failure is logged."""
        rows = list(predictions)
        self._submit(lambda db: insert_predictions(db, rows, self.clock()), True, False, [rows])

    # -- feedback -------------------------------------------------------------------------

    def record_feedback(self, model: str, request_id: str, label: int) -> dict[str, Any]:
        """Attach the true ``label`` to a prediction; the first label for an id wins.

        Returns once committed durably. Raises ``LedgerError`` 404 for an unknown or
        expired id, 409 for a second label.
        """
        return self._call(
            lambda db: attach_label(db, model, request_id, label, self.clock()), True, True
        )

    async def record_feedback_async(
        self, model: str, request_id: str, label: int
    ) -> dict[str, Any]:
        """As ``record_feedback``; an unknown id that a server made in the last
        ``WRITE_BEHIND_WINDOW_S`` is looked up again until the window ends."""
        young_until = made_at(request_id) + WRITE_BEHIND_WINDOW_S
        while True:
            try:
                return await self._await(
                    lambda db: attach_label(db, model, request_id, label, self.clock()), True, True
                )
            except LedgerError as exc:
                if exc.status != 404 or time.time() >= young_until:
                    raise
            await asyncio.sleep(FEEDBACK_RETRY_S)

    # -- epochs and counts ----------------------------------------------------------------

    def open_epoch(self, model: str, fingerprint: str) -> int:
        """The model's latest epoch if it has this fingerprint, else a new one (1, 2, ...)."""
        return self._call(lambda db: epoch_for(db, model, fingerprint, self.clock()), True, True)

    async def open_epoch_async(self, model: str, fingerprint: str) -> int:
        return await self._await(
            lambda db: epoch_for(db, model, fingerprint, self.clock()), True, True
        )

    def counts(self, model: str, epoch: int | None = None) -> dict[str, tuple[int, int]]:
        """Version -> (labelled, correct) of routed predictions in ``epoch`` (default: the
        model's latest)."""
        rows = self._call(lambda db: read_counts(db, model, epoch), write=False)
        return {version: (labelled, correct) for version, _, labelled, correct in rows}

    def requests(self, model: str, epoch: int | None = None) -> dict[str, int]:
        """Version -> routed predictions in ``epoch``, labelled or not."""
        rows = self._call(lambda db: read_counts(db, model, epoch), write=False)
        return {version: requests for version, requests, _, _ in rows}

    def outcomes(self, model: str, epoch: int | None, version: str) -> list[int]:
        """A version's routed outcomes in ``epoch`` (1 correct, 0 wrong), in label order."""
        return self._call(lambda db: read_outcomes(db, model, epoch, version), write=False)

    def expire(self) -> int:
        """Delete up to one chunk of predictions older than the retention; how many."""
        if self.retention_s is None:
            return 0
        cutoff = self.clock() - self.retention_s
        return self._call(lambda db: expire_before(db, cutoff))

    def __len__(self) -> int:
        """Predictions stored (all models)."""
        rows = self._call(lambda db: db.rows("SELECT COUNT(*) FROM randkit_predictions"), False)
        return int(rows[0][0])
