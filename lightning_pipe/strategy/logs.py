"""Relaying what the user's step logs on the last stage to every rank, one value per step.

While a micro-batch runs, ``LightningModule.log`` is replaced by a recorder. After the step the last stage
combines each name's per-micro-batch values as the full batch would give them (weighted mean by default, else the
``reduce_fx`` given), the combined values are broadcast to every rank of the pipeline, and every rank makes the
same real ``self.log`` calls, so progress bar, ``callback_metrics``, loggers and callbacks agree everywhere and
``sync_dist`` collectives are entered by all ranks. A torchmetrics ``Metric`` is relayed by its attribute name, with
its on-step value (the micro-batches' forward values weighted by their share), and logged on every rank from its
own copy, which fetches the last stage's state when it is computed (:mod:`.metric_states`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torchmetrics import Metric

__all__ = ["LogRecord", "LogRecorder", "combine_records", "replay", "replay_prints"]

_MEAN, _SUM, _MAX, _MIN = "mean", "sum", "max", "min"
_REDUCE_NAMES: dict[Any, str] = {
    "mean": _MEAN, "avg": _MEAN, torch.mean: _MEAN,
    "sum": _SUM, torch.sum: _SUM,
    "max": _MAX, torch.max: _MAX, max: _MAX,
    "min": _MIN, torch.min: _MIN, min: _MIN,
}


@dataclass
class LogRecord:
    """One name logged in one step: its value (combined over micro-batches) and the ``self.log`` options."""

    name: str
    value: Any
    kwargs: dict[str, Any]
    metric_attribute: str | None = None
    """Set when the value is a torchmetrics ``Metric``: its attribute path in the LightningModule."""


@dataclass
class LogRecorder:
    """Collects ``self.log`` calls per micro-batch, and ``self.print`` calls."""

    module: torch.nn.Module
    calls: dict[str, list[tuple[int, Any, dict[str, Any], str | None]]] = field(default_factory=dict)
    prints: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    """``self.print`` calls, in order, made printable on another rank (:func:`replay_prints`)."""
    local_files: bool = False
    """Whether ``self.print(..., file=f)`` to a file of this process writes it here (as rank 0 of one device would:
    the last stage of the first replica); such a call cannot be relayed."""
    _metric_names: dict[int, str] | None = None

    @contextlib.contextmanager
    def capture(self, microbatch: int) -> Iterator[None]:
        """Within this block, ``module.log`` and ``module.print`` record instead of logging and printing.

        ``self.print`` prints on global rank 0 only, which holds the first stage (but under ``zbv``): the step's
        code after the chain runs on the last stage, so its prints are relayed with the logged values and printed
        on rank 0 (:func:`replay_prints`)."""

        def record(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if args:
                raise TypeError("lightning_pipe relays self.log(name, value, **options): pass options by keyword")
            attribute = kwargs.pop("metric_attribute", None)
            if isinstance(value, Metric):
                attribute = attribute or self._metric_name(value, name)
                # What its forward gave for this micro-batch (what Lightning logs on step), not the object.
                cache = value._forward_cache
                value = cache.detach() if isinstance(cache, torch.Tensor) else None
            elif isinstance(value, torch.Tensor):
                value = value.detach()
            self.calls.setdefault(name, []).append((microbatch, value, kwargs, attribute))

        def say(*args: Any, **kwargs: Any) -> None:
            stream = kwargs.pop("file", None)
            if stream not in (None, sys.stdout, sys.stderr):  # a file of this process: written here, or nowhere
                if self.local_files:
                    print(*args, file=stream, **kwargs)
                return
            if stream is sys.stderr:
                kwargs["file"] = "stderr"
            # What print would show, in a form that every rank can receive (a tensor shows its str() anyway).
            self.prints.append((tuple(_plain(a) for a in args), {k: _plain(v) for k, v in kwargs.items()}))

        owned = {name: self.module.__dict__.get(name) for name in ("log", "print")}  # a user's own, put back after
        self.module.log, self.module.print = record, say  # type: ignore[method-assign]
        try:
            yield
        finally:
            for name, own in owned.items():
                if own is None:
                    delattr(self.module, name)
                else:
                    setattr(self.module, name, own)

    def _metric_name(self, metric: Metric, name: str) -> str:
        if self._metric_names is None:
            self._metric_names = {id(m): n for n, m in self.module.named_modules() if isinstance(m, Metric)}
        try:
            return self._metric_names[id(metric)]
        except KeyError:
            raise ValueError(f"self.log({name!r}, metric): the Metric must be an attribute (submodule) of the "
                             "LightningModule so that every pipeline stage can log its own copy") from None


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _reduce_name(reduce_fx: Any, name: str) -> str:
    try:
        return _REDUCE_NAMES[reduce_fx]
    except (KeyError, TypeError):
        raise ValueError(f"self.log({name!r}, reduce_fx={reduce_fx!r}): under a pipeline, values logged per "
                         "micro-batch are combined with 'mean', 'sum', 'max' or 'min'") from None


def combine_records(recorder: LogRecorder, weights: list[float],
                    samples: Sequence[int] | None = None) -> list[LogRecord]:
    """The records to log for the step: per name, the micro-batch values combined as the full batch would give them
    (``samples``: each micro-batch's sample count, which tells ``batch_size=x.size(0)`` from a constant).

    A name logged several times in a step (as on one device: the last call shows on step, every call counts in the
    epoch value) gives one record per call, the k-th combining each micro-batch's k-th call. A name logged by some
    micro-batches only (under a condition on the data) combines those, weighted among themselves.
    """
    records = []
    for name, calls in recorder.calls.items():
        attribute = calls[-1][3]
        if attribute is not None:
            records.append(_combine_metric(name, calls, weights))
            continue
        rounds: list[list[tuple[int, Any, dict[str, Any], str | None]]] = []
        made: dict[int, int] = {}
        for call in calls:
            k = made[call[0]] = made.get(call[0], -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(call)
        records += [_combine(name, r, weights, samples) for r in rounds]
    return records


def _combine_metric(name: str, calls: list[tuple[int, Any, dict[str, Any], str | None]],
                    weights: list[float]) -> LogRecord:
    """A Metric: the value it shows on step is the micro-batches' forward values, weighted by their share of the
    batch (exact for accuracies and means, not for sums or maxima); its epoch value is computed from the last
    stage's state."""
    kwargs = dict(calls[-1][2])
    kwargs.pop("batch_size", None)
    # Each micro-batch's last forward value; those of the micro-batches that logged it, weighted among themselves
    # (as for other names), so that every rank shows the same value on step: left unset, each would show its own.
    caches = {mb: v for mb, v, _, _ in calls if isinstance(v, torch.Tensor)}
    step_value = None
    if caches:
        total = sum(weights[mb] for mb in caches)
        share = {mb: weights[mb] / total if total > 0 else 1.0 / len(caches) for mb in caches}
        step_value = sum(share[mb] * v.double() for mb, v in caches.items()).to(next(iter(caches.values())).dtype)
        step_value = step_value.cpu()
    return LogRecord(name, step_value, kwargs, calls[-1][3])


def _combine(name: str, calls: list[tuple[int, Any, dict[str, Any], str | None]], weights: list[float],
             samples: Sequence[int] | None) -> LogRecord:
    """One record from one call per micro-batch (of all micro-batches, or of those that made it)."""
    _, last_value, kwargs, _ = calls[-1]
    kwargs = dict(kwargs)
    # Without batch_size the relayed value stands for the whole batch and Lightning infers its size (for some
    # micro-batches only: their samples are passed). With it, see below: a constant is the batch's size; counts that
    # differ per micro-batch weigh their values.
    kwargs.pop("batch_size", None)
    present = [mb for mb, _, _, _ in calls]
    every = sorted(present) == list(range(len(weights)))
    if every:
        share = {mb: weights[mb] for mb in present}
    else:  # the micro-batches that logged it, weighted among themselves
        total_weight = sum(weights[mb] for mb in present)
        share = {mb: (weights[mb] / total_weight if total_weight > 0 else 1.0 / len(present)) for mb in present}
    if any(c[2].get("batch_size") is not None for c in calls) and \
            any(c[2].get("batch_size") is None for c in calls):
        raise ValueError(f"self.log({name!r}, batch_size=...) must be given in every micro-batch's call or in "
                         "none under a pipeline")
    how = _reduce_name(kwargs.get("reduce_fx", "mean"), name)
    values = [torch.as_tensor(v, dtype=torch.float64 if not isinstance(v, torch.Tensor) else None)
              for _, v, _, _ in calls]
    given = [c[2].get("batch_size") for c in calls]
    if given[0] is not None:
        own = [samples[mb] for mb in present] if samples is not None else None
        if len(set(given)) == 1 and given != own:
            # The same number in every micro-batch, not each one's sample count: a batch size written as a
            # constant (as on one device); the samples weigh the values, and it is passed on.
            kwargs["batch_size"] = given[0]
        else:  # counted per micro-batch (x.size(0), tokens): each value stands for its count, the step for the sum
            total = sum(given)
            kwargs["batch_size"] = total
            share = {mb: size / total for mb, size in zip(present, given)} if total else share
    elif not every and samples is not None:
        kwargs["batch_size"] = sum(samples[mb] for mb in present)
    # Means and sums in float64, then back to the value's dtype: in its own dtype a weighted mean of an integer is
    # taken in float32 and truncated (7 logged by every micro-batch gave 6), and in bfloat16 each term rounds (7.0
    # gave 6.97). A mean of integers is a float (Lightning logs it as one).
    if how == _MEAN:
        value: Any = sum(share[mb] * v.double() for mb, v in zip(present, values))
    elif how == _SUM:
        value = sum(v.double() if v.is_floating_point() else v for v in values)
    else:
        stacked = torch.stack([v.to(values[0].dtype) for v in values])
        value = stacked.max(0).values if how == _MAX else stacked.min(0).values
    if isinstance(last_value, torch.Tensor):
        integral = not (last_value.is_floating_point() or last_value.is_complex())
        value = value.to(torch.get_default_dtype() if integral and how == _MEAN else last_value.dtype)
    return LogRecord(name, value.cpu() if isinstance(value, torch.Tensor) else value, kwargs)


def replay_prints(module: Any, prints: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    """Make the ``self.print`` calls the last stage recorded (:class:`LogRecorder`): they print on rank 0."""
    for args, kwargs in prints:
        if kwargs.get("file") == "stderr":
            kwargs = {**kwargs, "file": sys.stderr}
        module.print(*args, **kwargs)


def replay(module: Any, records: list[LogRecord], device: torch.device,
           log: Callable[..., None] | None = None, *, same_everywhere: bool = False) -> None:
    """Make the real ``self.log`` calls for ``records`` on this rank.

    ``same_everywhere``: every process logs these same values (a pipeline without data-parallel replicas). Values
    are then logged with ``sync_dist=True`` (unless a ``sync_dist_group`` is given), which the strategy's ``reduce``
    leaves as they are (as one device would): without it Lightning warns, for each value logged per epoch, that the
    processes' values might differ and asks for ``sync_dist=True``.
    """
    log = log or module.log
    for record in records:
        if record.metric_attribute is not None:
            metric = module.get_submodule(record.metric_attribute)
            if record.value is not None:  # what Lightning reads for the on-step value, the same on every rank
                metric._forward_cache = record.value.to(device)
            log(record.name, metric, metric_attribute=record.metric_attribute, **record.kwargs)
        else:
            value = record.value.to(device) if isinstance(record.value, torch.Tensor) else record.value
            kwargs = record.kwargs
            if same_everywhere and kwargs.get("sync_dist_group") is None:
                kwargs = {**kwargs, "sync_dist": True}
            log(record.name, value, **kwargs)
