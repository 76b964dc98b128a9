"""Recording ``self.log`` per micro-batch, combining and replaying (``lightning_pipe.strategy.logs``)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from lightning_pipe.strategy.logs import LogRecord, LogRecorder, combine_records, replay


class Module(nn.Module):
    """Stands in for a LightningModule: a ``log`` method and a metric attribute (one nested)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.acc = MeanMetric()
        self.sub = nn.Module()
        self.sub.total = SumMetric()
        self.real_calls: list[tuple[str, Any]] = []

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.real_calls.append((name, value))


Call = tuple[str, Any, dict[str, Any]]


def recording() -> tuple[list[Call], Callable[..., None]]:
    calls: list[Call] = []

    def log(name: str, value: Any, **kwargs: Any) -> None:
        calls.append((name, value, kwargs))

    return calls, log


def record(module: Module, per_microbatch: list[list[tuple[str, Any, dict[str, Any]]]]) -> LogRecorder:
    """Run ``module.log(name, value, **kwargs)`` for each micro-batch under capture."""
    recorder = LogRecorder(module)
    for mb, calls in enumerate(per_microbatch):
        with recorder.capture(mb):
            for name, value, kwargs in calls:
                module.log(name, value, **kwargs)
    return recorder


def by_name(records: list[LogRecord]) -> dict[str, LogRecord]:
    return {r.name: r for r in records}


# --- capture -------------------------------------------------------------------------------------------------


def test_capture_replaces_and_restores_log() -> None:
    module = Module()
    recorder = LogRecorder(module)
    with recorder.capture(0):
        assert getattr(module.log, "__func__", None) is not Module.log
        module.log("loss", torch.tensor(1.0))
    assert module.log.__func__ is Module.log  # type: ignore[attr-defined]
    assert module.real_calls == []
    assert list(recorder.calls) == ["loss"]
    module.log("after", 1.0)
    assert module.real_calls == [("after", 1.0)]


def test_capture_restores_log_when_body_raises() -> None:
    module = Module()
    recorder = LogRecorder(module)
    with pytest.raises(RuntimeError, match="boom"):
        with recorder.capture(0):
            raise RuntimeError("boom")
    assert module.log.__func__ is Module.log  # type: ignore[attr-defined]


def test_capture_detaches_tensors() -> None:
    module = Module()
    loss = module.linear(torch.ones(1, 2)).sum()
    recorder = record(module, [[("loss", loss, {})]])
    (_, value, _, _), = recorder.calls["loss"]
    assert not value.requires_grad


def test_capture_rejects_positional_options() -> None:
    module = Module()
    recorder = LogRecorder(module)
    with recorder.capture(0), pytest.raises(TypeError, match="by keyword"):
        module.log("loss", 1.0, True)  # type: ignore[call-arg]


# --- combine_records -----------------------------------------------------------------------------------------


def test_weighted_mean_equals_full_batch_mean() -> None:
    """Micro-batches of 3, 1 and 2 samples: weights 3/6, 1/6, 2/6 give the mean over all 6."""
    full = torch.tensor([0.5, 2.0, -1.0, 4.0, 3.0, 7.5])
    parts = [full[:3], full[3:4], full[4:]]
    weights = [len(p) / len(full) for p in parts]
    recorder = record(Module(), [[("loss", p.mean(), {"prog_bar": True})] for p in parts])
    (rec,) = combine_records(recorder, weights)
    assert rec.name == "loss" and rec.kwargs == {"prog_bar": True} and rec.metric_attribute is None
    assert rec.value.dtype == torch.float32
    torch.testing.assert_close(rec.value, full.mean())


@pytest.mark.parametrize(
    ("reduce_fx", "expected"),
    [("sum", 6.0), (torch.sum, 6.0), ("max", 4.0), (torch.max, 4.0), (max, 4.0), ("min", -1.0),
     (torch.min, -1.0), (min, -1.0), ("mean", 2.0), ("avg", 2.0), (torch.mean, 2.0)],
)
def test_reduce_fx(reduce_fx: Any, expected: float) -> None:
    values = [torch.tensor(3.0), torch.tensor(-1.0), torch.tensor(4.0)]
    recorder = record(Module(), [[("x", v, {"reduce_fx": reduce_fx})] for v in values])
    (rec,) = combine_records(recorder, [1 / 3] * 3)
    assert rec.kwargs == {"reduce_fx": reduce_fx}
    assert rec.value.dtype == torch.float32
    torch.testing.assert_close(rec.value, torch.tensor(expected))


def test_batch_size_weighs_the_micro_batches_and_is_summed() -> None:
    """Each micro-batch's value stands for its batch_size (here not the sample shares 0.5/0.5)."""
    recorder = record(Module(), [[("x", torch.tensor(1.0), {"batch_size": 3, "on_epoch": True})],
                                 [("x", torch.tensor(2.0), {"batch_size": 1, "on_epoch": True})]])
    (rec,) = combine_records(recorder, [0.5, 0.5])
    assert rec.kwargs == {"on_epoch": True, "batch_size": 4}
    torch.testing.assert_close(rec.value, torch.tensor(1.25))


def test_without_batch_size_the_batch_size_is_left_to_lightning() -> None:
    recorder = record(Module(), [[("x", torch.tensor(1.0), {"on_epoch": True})],
                                 [("x", torch.tensor(2.0), {"on_epoch": True})]])
    (rec,) = combine_records(recorder, [0.75, 0.25])
    assert rec.kwargs == {"on_epoch": True}
    torch.testing.assert_close(rec.value, torch.tensor(1.25))


def test_batch_size_in_some_micro_batches_only_is_refused() -> None:
    recorder = record(Module(), [[("x", torch.tensor(1.0), {"batch_size": 3})], [("x", torch.tensor(2.0), {})]])
    with pytest.raises(ValueError, match="batch_size=...\\) must be given in every micro-batch's call or in none"):
        combine_records(recorder, [0.5, 0.5])


@pytest.mark.parametrize(("value", "dtype"), [(torch.tensor(7), torch.float32), (torch.tensor(140), torch.float32),
                                              (torch.tensor(7.0, dtype=torch.bfloat16), torch.bfloat16),
                                              (torch.tensor(0.7, dtype=torch.bfloat16), torch.bfloat16)])
def test_a_constant_is_averaged_exactly_whatever_its_dtype(value: torch.Tensor, dtype: torch.dtype) -> None:
    """A batch of 21 in micro-batches of 6, 5, 5, 5: every micro-batch logs the same value, and so does the step
    (an int64 came out one too low, a bfloat16 one rounding step off). A mean of integers is a float."""
    weights = [6 / 21, 5 / 21, 5 / 21, 5 / 21]
    recorder = record(Module(), [[("x", value.clone(), {}), ("s", value.clone(), {"reduce_fx": "sum"})]
                                 for _ in weights])
    records = by_name(combine_records(recorder, weights))
    assert records["x"].value.dtype == dtype and records["x"].value.item() == value.item()
    assert records["s"].value.dtype == value.dtype and records["s"].value.item() == (value.double() * 4).to(
        value.dtype).item()


def test_python_floats() -> None:
    recorder = record(Module(), [[("lr", 0.5, {}), ("n", 2.0, {"reduce_fx": "sum"})],
                                 [("lr", 1.5, {}), ("n", 3.0, {"reduce_fx": "sum"})]])
    records = by_name(combine_records(recorder, [0.5, 0.5]))
    assert float(records["lr"].value) == 1.0
    assert float(records["n"].value) == 5.0


def test_a_metric_forwarded_by_some_micro_batches_shows_their_values_on_step() -> None:
    """``if cond: self.acc(x); self.log("acc", self.acc)`` in micro-batches 0 and 2 of 3: their forward values,
    weighted among themselves, relayed (left unset, every rank showed its own leftover value)."""
    module = Module()
    recorder = LogRecorder(module)
    for mb, value in ((0, 1.0), (2, 4.0)):
        with recorder.capture(mb):
            module.acc(torch.tensor(value))
            module.log("acc", module.acc)
    with recorder.capture(1):
        pass
    (rec,) = combine_records(recorder, [0.5, 0.25, 0.25])
    assert rec.metric_attribute == "acc"
    torch.testing.assert_close(rec.value, torch.tensor(2.0))  # (0.5 * 1 + 0.25 * 4) / 0.75


def test_metric_relayed_by_attribute() -> None:
    module = Module()
    recorder = record(module, [[("acc", module.acc, {"prog_bar": True}), ("total", module.sub.total, {})],
                               [("acc", module.acc, {"prog_bar": True}), ("total", module.sub.total, {})]])
    records = by_name(combine_records(recorder, [0.5, 0.5]))
    assert records["acc"].metric_attribute == "acc" and records["acc"].value is None
    assert records["acc"].kwargs == {"prog_bar": True}
    assert records["total"].metric_attribute == "sub.total"


def test_metric_not_a_submodule() -> None:
    module = Module()
    loose = MeanMetric()
    recorder = LogRecorder(module)
    with recorder.capture(0), pytest.raises(ValueError, match="must be an attribute"):
        module.log("loose", loose)


def test_unknown_reduce_fx() -> None:
    recorder = record(Module(), [[("x", torch.tensor(1.0), {"reduce_fx": "median"})]])
    with pytest.raises(ValueError, match="reduce_fx='median'"):
        combine_records(recorder, [1.0])


def test_a_name_logged_by_some_micro_batches_combines_those() -> None:
    """Logged under a condition on the data: the micro-batches that logged it, weighted among themselves (3:1),
    stand for their samples (4 of 6)."""
    recorder = record(Module(), [[("x", torch.tensor(1.0), {})], [], [("x", torch.tensor(3.0), {"reduce_fx": "mean"})]])
    (rec,) = combine_records(recorder, [0.5, 1 / 3, 1 / 6], samples=[3, 2, 1])
    torch.testing.assert_close(rec.value, torch.tensor(1.5))
    assert rec.kwargs == {"reduce_fx": "mean", "batch_size": 4}
    # Without the sample counts Lightning infers the size, as for a name every micro-batch logs.
    (rec,) = combine_records(recorder, [0.5, 1 / 3, 1 / 6])
    assert rec.kwargs == {"reduce_fx": "mean"}
    # A sum adds what was logged.
    recorder = record(Module(), [[("n", 2.0, {"reduce_fx": "sum"})], [], [("n", 5.0, {"reduce_fx": "sum"})]])
    (rec,) = combine_records(recorder, [0.5, 1 / 3, 1 / 6])
    assert float(rec.value) == 7.0


def test_a_name_logged_twice_gives_a_record_per_call() -> None:
    """As on one device, where the last call shows on step and both count in the epoch value: the k-th record
    combines each micro-batch's k-th call (here the second call only in micro-batch 0)."""
    recorder = record(Module(), [[("x", torch.tensor(1.0), {}), ("x", torch.tensor(2.0), {})],
                                 [("x", torch.tensor(3.0), {})]])
    first, second = combine_records(recorder, [0.5, 0.5], samples=[2, 2])
    assert first.name == second.name == "x"
    torch.testing.assert_close(first.value, torch.tensor(2.0))
    assert first.kwargs == {}
    torch.testing.assert_close(second.value, torch.tensor(2.0))
    assert second.kwargs == {"batch_size": 2}


# --- replay --------------------------------------------------------------------------------------------------


def test_replay_calls_log() -> None:
    module = Module()
    records = [
        LogRecord("loss", torch.tensor(0.25), {"prog_bar": True, "sync_dist": True}),
        LogRecord("lr", 0.1, {}),
        LogRecord("acc", None, {"on_epoch": True}, metric_attribute="acc"),
        LogRecord("total", None, {}, metric_attribute="sub.total"),
    ]
    calls, log = recording()
    replay(module, records, torch.device("cpu"), log=log)
    assert [c[0] for c in calls] == ["loss", "lr", "acc", "total"]
    torch.testing.assert_close(calls[0][1], torch.tensor(0.25))
    assert calls[0][2] == {"prog_bar": True, "sync_dist": True}
    assert calls[1][1:] == (0.1, {})
    assert calls[2][1] is module.acc and calls[2][2] == {"on_epoch": True, "metric_attribute": "acc"}
    assert calls[3][1] is module.sub.total and calls[3][2] == {"metric_attribute": "sub.total"}
    assert module.real_calls == []


def test_round_trip_to_another_copy() -> None:
    """Records made on one stage's module, replayed on another's: metrics resolve to the other copy."""
    last, other = Module(), Module()
    recorder = record(last, [[("loss", torch.tensor(1.0), {}), ("acc", last.acc, {})],
                             [("loss", torch.tensor(3.0), {}), ("acc", last.acc, {})]])
    calls, log = recording()
    replay(other, combine_records(recorder, [0.5, 0.5]), torch.device("cpu"), log=log)
    assert [c[0] for c in calls] == ["loss", "acc"]
    torch.testing.assert_close(calls[0][1], torch.tensor(2.0))
    assert calls[1][1] is other.acc


@pytest.mark.parametrize(("given", "samples", "expected_size", "expected_value"), [
    ((2, 2, 2, 2), (2, 2, 2, 2), 8, 2.5),      # batch_size=x.size(0): each micro-batch's own count, summed
    ((2, 1, 1, 1), (2, 1, 1, 1), 5, 2.2),      # the same on a short last batch: values weighed by the counts
    ((32, 32, 32, 32), (2, 2, 2, 2), 32, 2.5),  # a constant, as written on one device: passed on
])
def test_batch_size_as_each_micro_batchs_size_counts_samples(given: tuple[int, ...], samples: tuple[int, ...],
                                                              expected_size: int, expected_value: float) -> None:
    """With batches of 8 then 5 logged with batch_size=x.size(0), the epoch mean weighs them 8 and 5 as on one
    device (passing the micro-batch size, 2, on as the batch's weighed them 2 and 5)."""
    values = [1.0, 2.0, 3.0, 4.0]
    recorder = record(Module(), [[("x", torch.tensor(v), {"batch_size": b, "on_epoch": True})]
                                 for v, b in zip(values, given)])
    weights = [s / sum(samples) for s in samples]
    (rec,) = combine_records(recorder, weights, samples)
    assert rec.kwargs == {"on_epoch": True, "batch_size": expected_size}
    torch.testing.assert_close(rec.value, torch.tensor(expected_value))
