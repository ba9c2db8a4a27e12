"""Shared pytest setup: every test gets a fresh event loop (pytest-asyncio, auto mode)."""
