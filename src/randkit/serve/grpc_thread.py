"""The gRPC server on a thread and event loop of its own.

``grpc.aio`` hands the calls it has received to its event loop one at a time, each after a
round trip through its poller thread; on the server's own loop, where short batches run
inline, a batch held those hand-overs back, so batches over gRPC held one or two requests.
On its own loop, gRPC takes calls in (and sends answers out) while the server's loop
computes, and each call's method runs on the server's loop (``on_main``), where the
batchers, the repository and the ledger live, so HTTP and gRPC share one set of them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from randkit.serve.server import Server

T = TypeVar("T")


class GrpcThread:
    """A started gRPC server (``start``), stopped with ``stop`` from the server's loop."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.main_loop = asyncio.get_running_loop()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="randkit-grpc", daemon=True
        )
        self.grpc: Any = None

    async def on_main(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the server's loop; cancelling the call cancels it there."""
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(coroutine, self.main_loop)
        )

    async def _on_grpc(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    async def start(self, host: str, port: int) -> int:
        """Start the thread and the gRPC server on ``host:port``; the port it bound."""
        from randkit.serve.grpc_service import start_grpc

        self.thread.start()
        self.grpc, bound = await self._on_grpc(start_grpc(self.server, host, port, self.on_main))
        return bound

    async def stop(self, grace: float) -> None:
        """Stop taking calls, let those in flight finish for up to ``grace`` seconds (their
        methods run on this loop, so it must keep turning meanwhile), then end the thread."""
        if self.grpc is not None:
            await self._on_grpc(self.grpc.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self.thread.join)
        self.loop.close()
