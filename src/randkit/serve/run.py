"""``randkit serve``: check the settings, then run the app under uvicorn until a signal
(uvicorn finishes the requests in flight before it stops)."""

from __future__ import annotations

import math
from pathlib import Path

from randkit.errors import UserError
from randkit.memory import keep_freed_memory
from randkit.serve.ledger_db import check_location
from randkit.serve.server import ServerSettings
from randkit.streams import check_seed

GRACEFUL_SHUTDOWN_S = 30


def check_settings(settings: ServerSettings) -> ServerSettings:
    """One clear error per bad setting (the CLI turns it into exit code 2)."""
    if not settings.repository.is_dir():
        raise UserError("repository", f"{str(settings.repository)!r} is not a directory")
    if not 0 <= settings.port <= 65535:
        raise UserError("--port", f"must be in [0, 65535], got {settings.port}")
    if settings.grpc_port is not None and not 0 <= settings.grpc_port <= 65535:
        raise UserError("--grpc-port", f"must be in [0, 65535], got {settings.grpc_port}")
    if settings.grpc_port is not None and settings.grpc_port == settings.port != 0:
        raise UserError("--grpc-port", f"must differ from --port, got {settings.grpc_port}")
    if settings.max_batch < 1:
        raise UserError("--max-batch", f"must be >= 1, got {settings.max_batch}")
    if not (math.isfinite(settings.max_delay_ms) and settings.max_delay_ms >= 0):
        raise UserError("--max-delay-ms", f"must be >= 0, got {settings.max_delay_ms}")
    if not (math.isfinite(settings.max_body_mb) and settings.max_body_mb > 0):
        raise UserError("--max-body-mb", f"must be > 0, got {settings.max_body_mb}")
    if not (math.isfinite(settings.body_timeout_s) and settings.body_timeout_s > 0):
        raise UserError("--body-timeout-s", f"must be > 0, got {settings.body_timeout_s}")
    if not 1 <= settings.workers <= 64:
        raise UserError("--workers", f"must be in [1, 64], got {settings.workers}")
    if settings.workers > 1 and settings.grpc_port == 0:
        raise UserError("--grpc-port", "give a port, not 0, with --workers: every worker binds it")
    if settings.threads is not None and not 1 <= settings.threads <= 1024:
        raise UserError("--threads", f"must be in [1, 1024], got {settings.threads}")
    if settings.token is not None and len(settings.token) < 8:
        raise UserError("--token", "must be at least 8 characters")
    check_location(settings.ledger, settings.repository)
    days = settings.ledger_retention_days
    if not (math.isfinite(days) and days > 0):
        raise UserError("--ledger-retention-days", f"must be > 0, got {days}")
    try:
        check_seed(settings.seed, "--seed")
    except ValueError as exc:
        raise UserError("--seed", str(exc)) from None
    return settings


def check_ledger_opens(settings: ServerSettings) -> None:
    """Open the ledger once before binding: an unreachable database or a read-only
    repository is one line and exit code 2, not a traceback from the app's startup."""
    from randkit.serve.ledger import FeedbackLedger, LedgerError
    from randkit.serve.ledger_db import ledger_location

    location = ledger_location(settings.ledger, settings.repository)
    try:
        FeedbackLedger(location, retention_days=None).close()
    except LedgerError as exc:
        hint = "" if settings.ledger else "; give --ledger a writable file or a postgresql:// URL"
        raise UserError("--ledger", f"cannot open {exc.message}{hint}") from None


def check_grpc_installed(settings: ServerSettings) -> None:
    """``--grpc-port`` needs grpcio and tritonclient's message classes (the serve extra):
    one line before binding rather than a traceback from the app's startup."""
    if settings.grpc_port is None:
        return
    try:
        import randkit.serve.grpc_service  # noqa: F401
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a grpcio older than the stubs
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError("--grpc-port", f"{why}: pip install 'randkit[serve]'") from None


def serve_forever(repository: Path, quiet: bool = False, **options: object) -> None:
    import uvicorn

    from randkit.serve.app import create_app

    settings = check_settings(ServerSettings(repository=Path(repository), **options))  # type: ignore[arg-type]
    from randkit.deploy.bundle import _device

    _device(settings.device)  # refuses an unknown device or CUDA without a GPU, before binding
    check_ledger_opens(settings)
    check_grpc_installed(settings)
    keep_freed_memory()
    log_level = "warning" if quiet else "info"
    if settings.workers > 1:
        from randkit.serve.workers import serve_workers

        serve_workers(settings, log_level, not quiet, GRACEFUL_SHUTDOWN_S)
        return
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=not quiet,
    )
