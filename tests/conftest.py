"""Shared fixtures: every test runs offline on tiny models and keeps its files under pytest's tmp dirs."""

from __future__ import annotations

import os

import pytest

# Keep the tiny preset cache inside the test session's temp area on CI-like fresh machines, but reuse it
# across tests in one session; no test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    from raylora.tiny import materialize_preset

    return materialize_preset("tiny-llama")
