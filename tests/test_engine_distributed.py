"""The engine on several gloo processes: transparency against one process, and failures that never hang."""

from __future__ import annotations

import os
import sys

import pytest

from tests._engine_workers import _shm_files
from tests._launch import launch

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5
# Every schedule; "name:v" holds v chunks per rank (interleaved_1f1b and zbv default to 2); "+early": with
# early_input_grads (W right after each B).
SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "interleaved_1f1b:3", "zero_bubble", "zero_bubble:2", "zbv",
             "1f1b+early", "interleaved_1f1b+early"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_transparency_against_one_process(world_size: int) -> None:
    """MLP and transformer stacks, every schedule (virtual stages, split backward), m in {1, 3, p, 2p+1} (uneven
    splits of 10 samples), two steps whose sequence length differs: the same loss and gradients as the unsplit
    model."""
    ms = sorted({1, 3, world_size, 2 * world_size + 1})
    outcomes = launch("tests._engine_workers.transparency", world_size, deadline=200,
                      models=["mlp", "transformer"], schedules=SCHEDULES, ms=ms)
    reports = [o.unwrap() for o in outcomes]
    expected = {f"{k}/{s}/m={m}" for k in ("mlp", "transformer") for s in SCHEDULES for m in ms}
    for rank, report in enumerate(reports):
        assert set(report) == expected
        worst = max(report.values())
        assert worst <= TOLERANCE, f"rank {rank}: {report}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_exact_size_protocol_matches_one_process(world_size: int) -> None:
    """The NCCL wire protocol (exact sizes, just-in-time receives, messages to lower ranks on a group of their own),
    run over gloo."""
    ms = [1, 2 * world_size + 1]
    outcomes = launch("tests._engine_workers.transparency", world_size, deadline=200,
                      models=["mlp", "transformer"], schedules=["gpipe", "1f1b", "zero_bubble:2", "zbv", "gpipe+early"],
                      ms=ms, exact=True)
    for outcome in outcomes:
        report = outcome.unwrap()
        assert len(report) == 20 and max(report.values()) <= TOLERANCE, report


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_exact_protocol_cannot_hang_under_nccl_stream_order(world_size: int) -> None:
    """NCCL runs a pair's sends and receives of one group in order on one stream, and a send may wait there for its
    receive. The operations the exact protocol makes (recorded over gloo) complete under that model for every
    schedule, with messages to lower ranks on a group of their own; on one group they would hang (the control: all
    but GPipe, whose messages go one way at a time)."""
    from tests._nccl_model import find_hang

    outcomes = launch("tests._engine_workers.exact_traces", world_size, deadline=200, schedules=SCHEDULES,
                      m=2 * world_size + 1)
    traces = [o.unwrap() for o in outcomes]
    for spec in SCHEDULES:
        mine = [t[spec] for t in traces]
        assert all(any(op[0] == "send" for op in t) for t in mine), spec
        assert find_hang(mine) is None, (spec, find_hang(mine))
        one_group = [[(op[0], "group", op[2]) if op[0] != "wait" else op for op in t] for t in mine]
        assert (find_hang(one_group) is None) == (spec == "gpipe"), spec


def test_the_nccl_model_finds_a_pair_sending_both_ways_on_one_stream() -> None:
    from tests._nccl_model import find_hang

    # Each rank sends to the other, then receives: on one group both sends head their streams and wait forever.
    both = [[("send", "g", 1), ("recv", "g", 1), ("wait", 1)], [("send", "g", 0), ("recv", "g", 0), ("wait", 1)]]
    assert "heads its stream" in (find_hang(both) or "")
    # One group per direction: each send meets its receive.
    split = [[("send", "up", 1), ("recv", "down", 1), ("wait", 1)],
             [("send", "down", 0), ("recv", "up", 0), ("wait", 1)]]
    assert find_hang(split) is None
    # A host waiting for a receive that its peer sends only after waiting for this host's later send.
    crossed = [[("recv", "down", 1), ("wait", 0), ("send", "up", 1)], [("recv", "up", 0), ("wait", 0),
                                                                      ("send", "down", 0)]]
    assert "rank 0 at ('wait', 0)" in (find_hang(crossed) or "")
    # A receive nobody sends.
    assert find_hang([[("recv", "g", 1), ("wait", 0)], []]) is not None


@pytest.mark.timeout(240)
def test_exact_size_protocol_on_one_group_matches_one_process() -> None:
    """The exact protocol with both directions on one group (allowed over gloo): activations and gradients between
    two ranks are matched by one order, which the interleaved and V schedules exercise (both kinds flow each way).
    The dataclass model also sends dataclasses and complex tensors."""
    outcomes = launch("tests._engine_workers.transparency", 2, deadline=200, models=["transformer", "dataclass"],
                      schedules=["interleaved_1f1b", "zero_bubble:2", "zbv"], ms=[1, 5], exact=True, one_group=True)
    for outcome in outcomes:
        report = outcome.unwrap()
        assert len(report) == 12 and max(report.values()) <= TOLERANCE, report


@pytest.mark.timeout(240)
def test_dataclasses_and_complex_tensors_cross_stages_with_their_gradients() -> None:
    """A dataclass (with a field ``__init__`` does not set) and a complex tensor between every two stages: their
    gradients flow back (before, a dataclass was pickled as a leaf and a complex tensor lost requires_grad, both
    silently)."""
    outcomes = launch("tests._engine_workers.transparency", 2, deadline=200, models=["dataclass"],
                      schedules=["1f1b", "zbv"], ms=[3])
    for outcome in outcomes:
        report = outcome.unwrap()
        assert len(report) == 2 and max(report.values()) <= TOLERANCE, report


@pytest.mark.timeout(240)
def test_receives_posted_when_needed_match_one_process() -> None:
    """gloo with receives posted only when needed (``post_ahead=0``; by default a few are posted ahead), over shapes
    that change between steps."""
    outcomes = launch("tests._engine_workers.transparency", 2, deadline=200, models=["mlp", "transformer"],
                      schedules=["1f1b", "interleaved_1f1b", "zbv"], ms=[1, 5], post_ahead=0)
    for outcome in outcomes:
        report = outcome.unwrap()
        assert len(report) == 12 and max(report.values()) <= TOLERANCE, report


@pytest.mark.timeout(120)
@pytest.mark.parametrize("exact", [False, True])
def test_values_needed_in_another_order_than_sent(exact: bool) -> None:
    """Rank 1 needs micro-batch 1's activation before micro-batch 0's. gloo matches by tag; the exact protocol, like
    NCCL, by order alone: it must receive micro-batch 0 first and keep it until needed. On gloo, before its first
    action a rank posts only the receives that action needs (rank 0: none; rank 1: micro-batch 1's activation):
    the rest of the window waits until after it, off the start of the pipeline. (The exact protocol posts each
    receive when needed: rank 1 receives micro-batch 0's activation first, so two.)"""
    for outcome in launch("tests._engine_workers.out_of_order", 2, deadline=100, exact=exact):
        error, posted_first = outcome.unwrap()
        assert error <= TOLERANCE
        assert posted_first == outcome.rank * (2 if exact else 1)


@pytest.mark.timeout(120)
def test_bad_setups_fail_at_once_on_every_rank_naming_the_setting() -> None:
    for outcome in launch("tests._engine_workers.bad_setups", 2, deadline=100):
        errors = outcome.unwrap()
        assert "is for 3 ranks but the pipeline group has 2 processes: build it with num_ranks=2" in errors["ranks"]
        assert f"but this process is rank {outcome.rank} of the pipeline group" in errors["rank"]
        assert "Transport(background=True) needs the gloo protocol on the CPU" in errors["background"]
        assert "leave background unset" in errors["background"]
        if outcome.rank == 1:  # the stage that starts with ReLU(inplace=True)
            assert errors["inplace"].startswith("PipelineError: stage 1 changes its input in place")
            assert "inplace=False" in errors["inplace"] and "balance" in errors["inplace"]
        else:  # told by rank 1 instead of waiting for its gradient
            assert errors["inplace"].startswith("PipelineCommError") and "changes its input in place" in \
                errors["inplace"]


@pytest.mark.timeout(120)
def test_control_unweighted_losses_differ() -> None:
    """Summing instead of weighting the micro-batch losses must be caught by the same comparison."""
    outcomes = launch("tests._engine_workers.transparency", 2, deadline=100, models=["mlp"], schedules=["1f1b"],
                      ms=[3], unweighted=True)
    for outcome in outcomes:
        assert max(outcome.unwrap().values()) > 1e-3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["gloo", "poster", "shm"])
def test_a_rank_that_raises_stops_every_other_rank_quickly(transport: str) -> None:
    """Also with the calls made on the transport's poster thread (the failure notices go out after the sends
    queued before them), and through shared memory."""
    timeout = 30.0
    before = _shm_files()
    outcomes = launch("tests._engine_workers.failing_step", 4, deadline=90, fail_rank=1, mode="raise",
                      timeout=timeout, background=transport == "poster", shm=transport == "shm")
    assert [f for f in _shm_files() if f not in before] == []
    assert outcomes[1].error_type == "ValueError" and "injected failure" in outcomes[1].error
    for outcome in outcomes:
        assert not outcome.hung
        if outcome.rank == 1:
            continue
        assert outcome.error_type == "PipelineCommError", (outcome.rank, outcome.error_type, outcome.error)
        # Each rank names itself and where it was, and carries the original cause, passed from rank to rank.
        assert outcome.error.startswith(f"pipeline rank {outcome.rank} (stage {outcome.rank}, action ")
        assert "failed instead of sending" in outcome.error
        assert "ValueError: injected failure in the user's forward" in outcome.error
        # The failure notice arrives long before the wait timeout.
        assert outcome.elapsed < timeout / 2, outcome.elapsed
        # And the pipeline refuses to run another step (stale messages of the failed one may still arrive).
        assert "cannot run again" in outcome.traceback


@pytest.mark.timeout(120)
def test_a_last_stage_failing_in_a_forward_only_step_leaves_no_sender_waiting() -> None:
    """Without a backward the earlier stages wait for nothing from the last one, but their sends complete only once
    received: the failing rank receives (and drops) what was still to come, so they finish at once instead of
    waiting for the timeout in their sends (the strategy then tells them of the failure)."""
    timeout = 30.0
    # 12 micro-batches: more than the failing rank had posted receives for (post_ahead: 5 at p=4).
    outcomes = launch("tests._engine_workers.failing_step", 4, deadline=90, fail_rank=3, mode="raise",
                      timeout=timeout, train=False, microbatches=12)
    assert outcomes[3].error_type == "ValueError" and "injected failure" in outcomes[3].error
    for outcome in outcomes[:3]:
        assert outcome.unwrap() == "finished"
        assert outcome.elapsed < timeout / 2, outcome.elapsed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shm", [False, True])
def test_a_crashed_process_is_noticed_without_waiting_for_the_timeout(shm: bool) -> None:
    """A rank that dies without a word (os._exit) is noticed through the closed connection (gloo), or the closed
    pipe (shared memory)."""
    timeout = 30.0
    before = _shm_files()
    outcomes = launch("tests._engine_workers.failing_step", 2, deadline=90, fail_rank=1, mode="exit",
                      timeout=timeout, shm=shm)
    assert [f for f in _shm_files() if f not in before] == []  # the survivor removed what the dead one left
    assert outcomes[1].error_type == "ProcessDied"
    rank0 = outcomes[0]
    assert rank0.error_type == "PipelineCommError", (rank0.error_type, rank0.error)
    assert "pipeline rank 0 (stage 0" in rank0.error and "with pipeline rank 1" in rank0.error
    assert "it may have crashed" in rank0.error
    assert rank0.elapsed < timeout / 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shm", [False, True])
def test_a_rank_that_stalls_turns_into_a_timeout_error(shm: bool) -> None:
    timeout = 4.0
    outcomes = launch("tests._engine_workers.failing_step", 2, deadline=60, fail_rank=1, mode="hang",
                      timeout=timeout, shm=shm)
    assert outcomes[1].error_type == "TimeoutError"
    rank0 = outcomes[0]
    assert rank0.error_type == "PipelineCommError", (rank0.error_type, rank0.error)
    assert "pipeline rank 0 (stage 0" in rank0.error and "with pipeline rank 1" in rank0.error
    assert "timeout" in rank0.error
    # One timeout, plus at most 2 s spent handing failure notices to peers, well before the stalled rank wakes up.
    assert rank0.elapsed < 2 * timeout + 3.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("background", [False, True])
def test_receives_prepared_for_the_last_layout_read_every_message_right(background: bool) -> None:
    """A receive prepares the value of the channel's last layout before the message comes; runs of one layout use
    it, and every change (shape, requires_grad, tree, leaf, overflow, failure notice) is parsed instead. The same
    with the calls made on the transport's poster thread."""
    outcomes = launch("tests._engine_workers.message_sequence", 2, deadline=100, background=background)
    counts = outcomes[1].unwrap()
    # With two receives posted ahead, a receive expects the layout of the message two before it. Prepared: the 3rd
    # "a", and the two "a" after "big" (an overflow leaves the expected layout as it was). "tree4" expects "tree3"
    # (same shapes, another leaf) and is parsed; so is the failure notice, which expects "a".
    assert (counts["prepared"], counts["parsed"]) == (3, 9), counts
    # And gloo's I/O thread was held in SCHED_BATCH during every send and receive call, on both ranks, and is back
    # in SCHED_OTHER after (engine/io_threads.py).
    if sys.platform.startswith("linux"):
        for report in (outcomes[0].unwrap(), counts):
            assert report["guarded"] >= 1 and report["disabled"] is None, report
            assert report["during_calls"] == [os.SCHED_BATCH] and report["after"] == [os.SCHED_OTHER], report
            assert report["callers"] == ["pipeline_poster" if background else "MainThread"], report


@pytest.mark.timeout(120)
def test_the_transport_moves_its_calls_to_the_poster_thread_while_steps_leave_the_cores_idle() -> None:
    """By default each step decides from the last one's idle shares (scripted here): on after an idle step, kept
    through a half busy one, off after a busy one, on again with the same thread; values arrive right in every
    mode, the overflow path included. A value changed in place before the poster copied it fails the sender at
    flush and reaches the receiver as an error naming the cause, not as a timeout."""
    outcomes = launch("tests._engine_workers.poster_modes", 2, deadline=100)
    for outcome in outcomes:
        report = outcome.unwrap()
        assert report["modes"] == [False, True, True, True, False, True], report
        poster, main = ["pipeline_poster"], ["MainThread"]
        assert report["callers"] == [main, poster, poster, poster, main], report
        assert report["same_thread"], report
        assert "changed in place after it was sent" in report["in_place"], report
        assert "Transport(background=False)" in report["in_place"], report
        assert report["closed"], report
    assert "pipeline rank 0 failed instead of sending micro-batch 7: PipelineError" in outcomes[1].unwrap()["in_place"]
    assert outcomes[1].unwrap()["inference"] is True


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", ["poster", "shm"])
def test_transparency_with_the_poster_thread_and_over_shared_memory(transport: str) -> None:
    """Every schedule with the gloo transport's sends and receive posts made on its poster thread (what it does by
    default while the cores sit idle), and through the shared-memory transport (what CPU ranks of one host use by
    default) with rings of 1 KiB that the values outgrow: the same loss and gradients as one process, trees,
    dataclasses, complex tensors and changing shapes included."""
    outcomes = launch("tests._engine_workers.transparency", 2, deadline=200,
                      models=["mlp", "transformer", "dataclass"], schedules=SCHEDULES, ms=[1, 5],
                      background=transport == "poster", shm=transport == "shm")
    for outcome in outcomes:
        report = outcome.unwrap()
        assert len(report) == 3 * len(SCHEDULES) * 2 and max(report.values()) <= TOLERANCE, report


@pytest.mark.timeout(120)
def test_shared_memory_channels_deliver_every_message_and_leave_no_file() -> None:
    outcomes = launch("tests._engine_workers.shm_channels", 2, deadline=100)
    sender, receiver = (outcome.unwrap() for outcome in outcomes)
    # Runs of one layout are copied into the value prepared when the receive was posted; every change is parsed.
    # As on gloo a receive expects the layout of the message two before it: prepared are the 3rd "a" and the "a"
    # two after another "a" (the one after "big" expects "big": no overflow path here, a big value is one message).
    assert (receiver["prepared"], receiver["parsed"]) == (2, 10), receiver
    assert receiver["out_of_order"], receiver
    assert receiver["odd"] == [True] * 8, receiver
    assert "pipeline rank 0 failed instead of sending" in receiver["failure"], receiver
    assert "RuntimeError: boom on purpose" in receiver["failure"], receiver
    # 512-byte rings: the 16 KB value (and those after it) moved the pair to larger rings, on both ends alike.
    assert sender["generations"] == receiver["generations"] >= 1, (sender, receiver)
    for report in (sender, receiver):
        assert report["left_after_setup"] == [] and report["left_after_close"] == [], report
        assert report["auto_here"] == "ShmTransport" and report["gloo_here"] == "Transport", report
        assert report["auto_elsewhere"] == "Transport", report
        assert "needs every rank of the pipeline on one Linux x86-64 host" in report["shm_elsewhere"], report
        assert "cpu_transport='gloo'" in report["shm_elsewhere"], report
