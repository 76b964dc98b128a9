"""Helpers shared by several test modules."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

from lightning_pipe.schedules import Schedule, gpipe, one_f_one_b

Generator = Callable[[int, int], Schedule]

GENERATORS: list[Generator] = [gpipe, one_f_one_b]
PROPERTY = settings(max_examples=150, deadline=None)

stages = st.integers(min_value=1, max_value=8)
microbatches = st.integers(min_value=1, max_value=32)
generators = st.sampled_from(GENERATORS)


def assert_same(a: Any, b: Any) -> None:
    """Equal structure, types, tensor shapes/dtypes/values and leaves."""
    assert type(a) is type(b), f"{type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, Mapping):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    else:
        assert a == b


def assert_usage_error(main: Callable[[list[str]], int], args: list[str], message: str,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """``main(args)`` exits as argparse does on bad values (status 2), with ``message`` on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err



class Encoding(collections.UserDict):  # type: ignore[type-arg]
    """Like a tokenizer's ``BatchEncoding``: a ``UserDict`` (not a ``dict``) whose keys are also attributes."""

    def __init__(self, data: Any = None, encoding: Any = None) -> None:
        super().__init__(data)
        self._encodings = encoding

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None
