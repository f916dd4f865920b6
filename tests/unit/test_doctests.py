"""The examples in the docstrings of modules no other unit test runs them for."""

from __future__ import annotations

import doctest
import types

import pytest

import batcher.card
import batcher.planning

MODULES = [batcher.card, batcher.planning]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_doctests(module: types.ModuleType) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
