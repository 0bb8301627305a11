"""The statements of the experiment ledger, run by its thread inside a transaction (see
``ledger.py``), and the values they take and raise."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from randkit.serve.ledger_db import Database

log = logging.getLogger("randkit.serve")
EXPIRE_CHUNK = 5000  # rows deleted per transaction, so that expiry never stalls requests
ROWS_PER_INSERT = 400  # 7 parameters each: under SQLite's 32,766-parameter limit


class LedgerError(Exception):
    """An operation the ledger refuses; ``status`` is the HTTP status to answer with and
    ``field`` what the message is about (``id`` or ``ledger``)."""

    def __init__(self, status: int, field: str, message: str) -> None:
        self.status, self.field, self.message = status, field, message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Prediction:
    """One answered input: ``epoch`` is the policy epoch of the model that answered."""

    model: str
    id: str
    version: str
    predicted: int
    routed: bool
    epoch: int = 0


def _shown(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_COUNT = (
    "INSERT INTO randkit_counts (model, epoch, version, requests, labelled, correct) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model, epoch, version) DO UPDATE SET "
    "requests = randkit_counts.requests + excluded.requests, "
    "labelled = randkit_counts.labelled + excluded.labelled, "
    "correct = randkit_counts.correct + excluded.correct"
)


def insert_predictions(db: Database, predictions: list[Prediction], now: float) -> None:
    inserted: set[tuple[str, str]] = set()
    for start in range(0, len(predictions), ROWS_PER_INSERT):
        chunk = predictions[start : start + ROWS_PER_INSERT]
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
        params = [
            x
            for p in chunk
            for x in (p.model, p.id, p.version, int(p.predicted), int(p.routed), p.epoch, now)
        ]
        returned = db.rows(
            "INSERT INTO randkit_predictions "
            "(model, id, version, predicted, routed, epoch, created) "
            f"VALUES {values} ON CONFLICT (model, id) DO NOTHING RETURNING model, id",
            params,
        )
        inserted.update((m, i) for m, i in returned)
    for p in predictions:
        if (p.model, p.id) not in inserted:  # rolled back with the savepoint
            raise LedgerError(
                409,
                "id",
                f"{_shown(p.id)} already names a prediction of model {p.model!r}; an id "
                "names one prediction (leave it out and the server makes a unique one)",
            )
    routed = Counter((p.model, p.epoch, p.version) for p in predictions if p.routed)
    for (model, epoch, version), n in routed.items():
        db.rows(_COUNT, (model, epoch, version, n, 0, 0))


def insert_prediction_parts(
    parts: list[list[Prediction]], now: float
) -> Callable[[Database], None]:
    """Insert several requests' predictions in one statement; if an id collides (then
    nothing of the statement is kept), each request's rows on their own, so that only the
    colliding request's are refused."""

    def run(db: Database) -> None:
        db.rows("SAVEPOINT merged")
        try:
            insert_predictions(db, [row for part in parts for row in part], now)
        except LedgerError:
            db.rows("ROLLBACK TO SAVEPOINT merged")
            for part in parts:
                db.rows("SAVEPOINT one")
                try:
                    insert_predictions(db, part, now)
                except LedgerError as exc:
                    db.rows("ROLLBACK TO SAVEPOINT one")
                    log.warning("ledger: %s", exc)
                db.rows("RELEASE SAVEPOINT one")
        db.rows("RELEASE SAVEPOINT merged")

    return run


def attach_label(
    db: Database, model: str, request_id: str, label: int, now: float
) -> dict[str, Any]:
    found = db.rows(
        "UPDATE randkit_predictions SET label = ?, labelled = ? "
        "WHERE model = ? AND id = ? AND label IS NULL "
        "RETURNING version, predicted, routed, epoch",
        (label, now, model, request_id),
    )
    if not found:
        previous = db.rows(
            "SELECT label FROM randkit_predictions WHERE model = ? AND id = ?",
            (model, request_id),
        )
        if not previous:
            raise LedgerError(
                404,
                "id",
                f"no prediction with id {_shown(request_id)} for model {model!r} "
                "(unknown, or older than the ledger's retention)",
            )
        raise LedgerError(
            409,
            "id",
            f"feedback for id {_shown(request_id)} was already given (label {previous[0][0]})",
        )
    version, predicted, routed, epoch = found[0]
    correct = int(predicted) == label
    if routed:
        (counted,) = db.rows(
            _COUNT + " RETURNING labelled", (model, epoch, version, 0, 1, int(correct))
        )
        # seq comes from the counts row, locked by the upsert: unique even across replicas.
        db.rows(
            "INSERT INTO randkit_outcomes (model, epoch, version, seq, correct) "
            "VALUES (?, ?, ?, ?, ?)",
            (model, epoch, version, int(counted[0]), int(correct)),
        )
    return {
        "id": request_id,
        "version": version,
        "predicted": int(predicted),
        "label": label,
        "correct": correct,
    }


def latest_epoch(db: Database, model: str) -> tuple[int, str] | None:
    rows = db.rows(
        "SELECT epoch, fingerprint FROM randkit_epochs WHERE model = ? ORDER BY epoch DESC LIMIT 1",
        (model,),
    )
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def epoch_for(db: Database, model: str, fingerprint: str, now: float) -> int:
    # SQLite holds the write lock for the whole transaction; in PostgreSQL a replica that
    # races us to the same epoch number makes our insert a no-op, and we read its row.
    for _ in range(8):
        latest = latest_epoch(db, model)
        if latest is not None and latest[1] == fingerprint:
            return latest[0]
        epoch = latest[0] + 1 if latest else 1
        db.rows(
            "INSERT INTO randkit_epochs (model, epoch, fingerprint, started) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (model, epoch) DO NOTHING",
            (model, epoch, fingerprint, now),
        )
    raise LedgerError(503, "ledger", f"could not open a policy epoch for model {model!r}")


def _epoch_or_latest(db: Database, model: str, epoch: int | None) -> int:
    if epoch is not None:
        return epoch
    latest = latest_epoch(db, model)
    return latest[0] if latest else 0


def read_counts(db: Database, model: str, epoch: int | None) -> list[tuple[str, int, int, int]]:
    epoch = _epoch_or_latest(db, model, epoch)
    rows = db.rows(
        "SELECT version, requests, labelled, correct FROM randkit_counts "
        "WHERE model = ? AND epoch = ? ORDER BY version",
        (model, epoch),
    )
    return [(str(v), int(r), int(n), int(c)) for v, r, n, c in rows]


def read_outcomes(db: Database, model: str, epoch: int | None, version: str) -> list[int]:
    """A version's routed outcomes (1 correct, 0 wrong) in label order."""
    epoch = _epoch_or_latest(db, model, epoch)
    rows = db.rows(
        "SELECT correct FROM randkit_outcomes WHERE model = ? AND epoch = ? AND version = ? "
        "ORDER BY seq",
        (model, epoch, version),
    )
    return [int(c) for (c,) in rows]


def expire_before(db: Database, cutoff: float) -> int:
    # Row values select one chunk portably (DELETE ... LIMIT is not standard SQL).
    rows = db.rows(
        "DELETE FROM randkit_predictions WHERE (model, id) IN (SELECT model, id FROM "
        "randkit_predictions WHERE created < ? LIMIT ?) RETURNING id",
        (cutoff, EXPIRE_CHUNK),
    )
    if rows:
        log.info("ledger: %d predictions older than the retention deleted", len(rows))
    return len(rows)
