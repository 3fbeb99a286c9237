"""What the routers that put replicas behind one endpoint read from a worker, in their own shapes:
smg's `GET /v1/loads` (WorkerLoadResponse), SGLang's `GET /get_load` (an array per DP rank), and
`/server_info` + `/model_info` (with SGLang's `/get_server_info`, `/get_model_info` aliases). The
numbers are the scheduler's, asked over the control channel as /stats asks them."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from typing import Awaitable, Callable

from fastapi import FastAPI

from serve.api import schemas as S
from serve.config import EngineConfig
from serve.model_files import ModelInfo


class Loads:
    def __init__(self, model: ModelInfo, engine: EngineConfig, model_path: str, version: str) -> None:
        self.model, self.engine, self.model_path, self.version = model, engine, model_path, version
        self.last: tuple[float, int] | None = None  # (busy seconds, tokens generated) at the last /v1/loads
        self.rate = 0.0

    def worker_load(self, stats: dict) -> dict:
        """smg's WorkerLoadResponse: one entry, DP rank 0. gen_throughput is tokens per second of work
        since the last call (SGLang's is its decode batches' rate), kept while idle: smg's power_of_two
        divides queued work by it, and a rate per second of wall time would make an idle replica look
        slow (0 is smg's cue to assume its default)."""
        busy, generated = stats["busy_s"], stats["generated_tokens"]
        if self.last is not None and busy > self.last[0]:
            self.rate = max(0.0, (generated - self.last[1]) / (busy - self.last[0]))
        self.last = (busy, generated)
        total = self.engine.kv_pool_tokens
        used = stats["pool_tokens_used"]
        running, waiting = stats["running"], stats["waiting"]
        return {
            "timestamp": datetime.now(timezone.utc).isoformat(), "dp_rank_count": 1,
            "loads": [{
                "dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting,
                "num_waiting_uncached_tokens": stats.get("waiting_tokens", 0), "num_total_reqs": running + waiting,
                "num_used_tokens": used, "max_total_num_tokens": total, "token_usage": round(used / total, 4),
                "gen_throughput": round(self.rate, 1),
                "cache_hit_rate": round(stats["cache_hit_tokens"] / stats["prompt_tokens"], 4) if stats.get("prompt_tokens") else 0.0,
                "utilization": round(running / self.engine.max_running_requests, 4),
                "max_running_requests": self.engine.max_running_requests,
            }],
        }

    @staticmethod
    def sglang_load(stats: dict) -> list[dict]:
        """SGLang's /get_load: what sglang-router's power_of_two reads."""
        return [{"dp_rank": 0, "num_reqs": stats["running"] + stats["waiting"], "num_waiting_reqs": stats["waiting"],
                 "num_tokens": stats["pool_tokens_used"]}]

    def server_info(self) -> dict:
        return {
            "model_path": self.model_path, "served_model_name": self.model.served_name, "tokenizer_path": self.model.hf_dir,
            "dp_size": 1, "tp_size": self.engine.tp, "max_total_tokens": self.engine.kv_pool_tokens,
            "max_running_requests": self.engine.max_running_requests, "context_length": self.model.max_model_len,
            "version": self.version, "engine": "serve",
        }

    def model_info(self) -> dict:
        try:
            architectures = json.loads((Path(self.model.hf_dir) / "config.json").read_text()).get("architectures", [])
        except (OSError, ValueError):
            architectures = []
        return {"model_path": self.model_path, "tokenizer_path": self.model.hf_dir, "is_generation": True,
                "model_type": self.model.model_type, "architectures": architectures, "served_model_name": self.model.served_name}


def add_load_routes(app: FastAPI, loads: Loads, scheduler_stats: Callable[[], Awaitable[dict]]) -> None:
    def shape(kind: str) -> dict:
        return {200: {"content": {"application/json": {"schema": {"type": kind}}}}, **S.ERRORS}

    @app.get("/v1/loads", responses=shape("object"))
    async def v1_loads() -> dict:
        return loads.worker_load(await scheduler_stats())

    @app.get("/get_load", responses=shape("array"))
    async def get_load() -> list:
        return loads.sglang_load(await scheduler_stats())

    @app.get("/server_info", responses=shape("object"))
    @app.get("/get_server_info", include_in_schema=False)
    async def server_info() -> dict:
        return loads.server_info()

    @app.get("/model_info", responses=shape("object"))
    @app.get("/get_model_info", include_in_schema=False)
    async def model_info() -> dict:
        return loads.model_info()
