"""Integration tests: the shipped models at full size, local Ray clusters, training recipes on
real data. All of them are ``slow``: the everyday loop is ``pytest -m "not slow"`` (unit tests
on micro configs, under a minute on 2 cores); CI runs everything."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
