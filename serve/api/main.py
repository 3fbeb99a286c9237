"""The api process: uvicorn serving the FastAPI app, with the ZeroMQ bridge on the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import uvicorn

from serve.api.bridge import Bridge
from serve.api.server import create_app
from serve.config import Config
from serve.ipc import Endpoints
from serve.model_files import ModelInfo
from serve.proc import Reporter


class _Server(uvicorn.Server):
    # The launcher owns shutdown: signals stop the whole pipeline, not just this process's HTTP loop.
    def capture_signals(self):  # uvicorn >= 0.29
        return contextlib.nullcontext()

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


async def _serve(reporter: Reporter, config: Config, model: ModelInfo, eps: Endpoints) -> None:
    bridge = Bridge(eps, model.served_name, config.server.log_requests)
    bridge.on_told = reporter.told
    bridge.start()
    app = create_app(bridge, model, config.server, config.engine, config.model.path)
    server = _Server(uvicorn.Config(
        app, host=config.server.host, port=config.server.port, log_level=config.server.log_level,
        access_log=config.server.log_level == "debug", timeout_graceful_shutdown=1,
    ))
    task = asyncio.create_task(server.serve())
    while not server.started:  # start-up only: uvicorn offers no event for "listening"
        if task.done():
            raise RuntimeError(f"could not listen on {config.server.host}:{config.server.port}")
        await asyncio.sleep(0.05)
    reporter.ready(url=f"http://{config.server.host}:{config.server.port}")

    async def drain_then_exit() -> None:
        await app.state.drain.run()
        server.should_exit = True

    # The launcher stops the api first, with SIGTERM: drain, then exit; the launcher stops the rest after.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(drain_then_exit()))
    await task


def main(reporter: Reporter, config: Config, model: ModelInfo, eps: Endpoints) -> None:
    try:
        import uvloop  # a faster event loop: the api's CPU per streamed token competes with the workers'
    except ImportError:
        uvloop = None
    (uvloop.run if uvloop else asyncio.run)(_serve(reporter, config, model, eps))
