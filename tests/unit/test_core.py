"""The core's Run on recording hosts: chains of steps side by side, a failure
in one stopping the other, per-run memo, one-host operations."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fabfile.core import Result, StepFailed, UserError
from fabfile.core.inventory import load
from fabfile.core.testing import RecordingRun

LAB = load(Path(__file__).resolve().parents[2] / "inventory/lab.yml")


def test_chains_run_side_by_side_each_in_order():
    run = RecordingRun(LAB)
    both = threading.Barrier(2, timeout=5)  # each chain's first step waits for the other's: they overlap
    order: list[str] = []

    def chain(name, host):
        def go():
            run.step(f"{name}: one", [host], lambda h: (both.wait(), order.append(f"{name} 1")))
            run.step(f"{name}: two", [host], lambda h: order.append(f"{name} 2"))
        return go

    run.side_by_side({"xmpp": chain("xmpp", "e1server"), "mail": chain("mail", "pxc1")})
    assert order.index("xmpp 1") < order.index("xmpp 2") and order.index("mail 1") < order.index("mail 2")


def test_a_failure_in_one_chain_stops_the_other_before_its_next_step():
    run = RecordingRun(LAB, answers={"e1server": [(r"^false", Result(stderr="broken", exited=3))]})
    started, failed = threading.Event(), threading.Event()
    ran: list[str] = []

    def xmpp():  # fails while the mail chain is in the middle of its first step
        try:
            run.step("xmpp: one", ["e1server"], lambda h: (started.wait(5), h.sh("false")))
        finally:
            failed.set()

    def mail():
        run.step("mail: one", ["pxc1"], lambda h: (started.set(), failed.wait(5), ran.append("mail 1")))
        run.step("mail: two", ["pxc1"], lambda h: ran.append("mail 2"))

    with pytest.raises(StepFailed) as err:
        run.side_by_side({"xmpp": xmpp, "mail": mail})
    assert ran == ["mail 1"]
    text = str(err.value)
    assert text.startswith("xmpp: step 'xmpp: one' failed") and "e1server" in text and "exited 3" in text
    assert "broken" in text and "mail:" not in text


def test_one_chain_runs_inline():
    run = RecordingRun(LAB)
    ran = []
    run.side_by_side({"only": lambda: ran.append(threading.current_thread() is threading.main_thread())})
    assert ran == [True]


def test_memo_computes_once_per_run_and_host():
    run = RecordingRun(LAB)
    calls = []
    for _ in range(3):
        run.memo("k", lambda: calls.append("run") or 1)
        run.session("e1server").memo("k", lambda: calls.append("host") or 2)
    assert calls == ["run", "host"]
    assert RecordingRun(LAB).session("e1server").memo("k", lambda: 3) == 3  # another run: computed again


def test_answering_prefers_and_falls_back_and_names_every_host_tried():
    run = RecordingRun(LAB, answers={"e2server": [(r"^ready$", Result()), (r"^holds-vip$", Result())],
                                     "e1server": [(r"^ready$", Result())]})
    assert run.answering(["e1server", "e2server"], what="node", probe="ready", prefer="holds-vip").name == "e2server"
    assert run.answering(["e1server", "e2server"], what="node", probe="ready").name == "e1server"
    run = RecordingRun(LAB)
    with pytest.raises(UserError, match=r"no node answers, nothing was changed \(e1server: node does not answer"):
        run.answering(["e1server", "e2server"], what="node", probe="ready")


def test_on_one_turns_a_host_failure_into_a_named_error():
    run = RecordingRun(LAB)
    with pytest.raises(UserError, match=r"^e1server: `false` exited 1"):
        run.on_one("op", run.session("e1server"), lambda h: h.sh("false") if h.probe("x").ok else h.read("false"))
