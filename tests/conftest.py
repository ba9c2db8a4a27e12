"""Shared pytest setup: every test gets a fresh event loop (pytest-asyncio, auto mode); fixtures
more than one test module uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from d7y_node.config import StoreConfig, TaskConfig
from d7y_node.metrics import Metrics
from d7y_node.piece_store import PieceStore
from d7y_node.tasks import TaskManager


@pytest.fixture
async def task_manager(tmp_path: Path) -> AsyncIterator[TaskManager]:
    """A real TaskManager over a real PieceStore in `tmp_path/store`; no retries, so a failing
    source fails the read at once."""
    metrics = Metrics()
    store = PieceStore(StoreConfig(data_dir=tmp_path / "store", gc_quota=1 << 40), metrics)
    await store.open()
    manager = TaskManager(store, TaskConfig(piece_retries=0), metrics)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.close()
        await store.close()
