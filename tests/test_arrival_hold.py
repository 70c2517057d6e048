"""ArrivalHold's decisions on a made-up clock (times in seconds; gather_s 2, delay_factor 0.5, prefill steps of
1 s: every number is exact in binary)."""

from tailorkv.scheduler.arrival_hold import ArrivalHold

PREFILL_S = 1.0


def hold() -> ArrivalHold:
    return ArrivalHold(gather_s=2.0, delay_factor=0.5)


def test_no_hold_while_requests_run():
    h = hold()
    h.came(0.0)
    assert h.hold_s(0.0, True, PREFILL_S, [0.0]) == 0.0


def test_a_lone_request_is_held_the_delay_after_it_came():
    h = hold()
    h.came(0.0)
    assert h.hold_s(0.0, False, PREFILL_S, [0.0]) == 0.5
    assert h.hold_s(0.25, False, PREFILL_S, [0.0]) == 0.25
    assert h.hold_s(0.5, False, PREFILL_S, [0.0]) == 0.0


def test_a_request_arriving_when_the_hold_began_is_waited_for_until_gather_s():
    h = hold()
    h.arrival_began("b", -0.25)
    h.came(0.0)  # A is submitted
    assert h.hold_s(0.0, False, PREFILL_S, [0.0]) == 2.0
    assert h.hold_s(1.5, False, PREFILL_S, [0.0]) == 0.5
    assert h.hold_s(2.0, False, PREFILL_S, [0.0]) == 0.0  # bounded: B never came


def test_once_the_awaited_request_is_in_the_delay_after_it_remains():
    h = hold()
    h.arrival_began("b", -0.25)
    h.came(0.0)
    assert h.hold_s(0.0, False, PREFILL_S, [0.0]) == 2.0
    assert h.arrival_ended("b") and not h.arrival_ended("b")
    h.came(0.75)  # B is submitted
    assert h.hold_s(0.75, False, PREFILL_S, [0.0, 0.75]) == 0.5


def test_a_request_that_began_arriving_after_the_hold_began_does_not_prolong_it():
    h = hold()
    h.came(0.0)
    assert h.hold_s(0.0, False, PREFILL_S, [0.0]) == 0.5
    h.arrival_began("c", 0.25)  # only the delay after its start counts
    assert h.hold_s(0.25, False, PREFILL_S, [0.0]) == 0.5
    assert h.hold_s(0.75, False, PREFILL_S, [0.0]) == 0.0


def test_a_new_hold_begins_after_a_step():
    h = hold()
    h.arrival_began("b", -0.25)
    h.came(0.0)
    assert h.hold_s(0.0, False, PREFILL_S, [0.0]) == 2.0
    assert h.hold_s(2.0, False, PREFILL_S, [0.0]) == 0.0
    h.stepped()
    h.arrival_began("d", 9.0)
    h.came(10.0)
    assert h.hold_s(10.0, False, PREFILL_S, [10.0]) == 2.0


def test_the_hold_ends_once_the_finished_requests_next_turns_are_in():
    h = hold()
    h.finished(10.0, 2)
    h.came(10.25)
    assert h.hold_s(10.25, False, PREFILL_S, [10.25]) == 0.5
    h.arrival_began("d", 10.5)
    assert h.hold_s(10.5, False, PREFILL_S, [10.25]) == 0.5  # D is arriving: not all in yet
    assert h.arrival_ended("d")
    h.came(10.5)
    assert h.hold_s(10.5, False, PREFILL_S, [9.0, 10.25, 10.5]) == 0.0


def test_after_a_finish_the_hold_waits_the_clients_turnaround():
    h = hold()
    h.finished(1.0, 1)
    h.came(2.0)  # turnaround 1
    h.finished(5.0, 1)
    h.came(5.5)  # turnaround (1 + 0.5) / 2
    h.finished(10.0, 2)
    assert h.hold_s(10.0, False, PREFILL_S, []) == 0.75 + 0.5
    h.stepped()
    h.finished(20.0, 2)
    h.came(30.0)  # far later: the estimate is capped at gather_s
    h.stepped()
    h.finished(40.0, 2)
    assert (
        h.hold_s(40.0, False, PREFILL_S, []) == 2.0
    )  # (0.75 + 2) / 2 + 0.5, then gather_s bounds it


def test_a_finish_of_no_request_changes_nothing():
    h = hold()
    h.came(0.0)
    h.finished(0.25, 0)
    assert h.hold_s(0.25, False, PREFILL_S, [0.0]) == 0.25


def test_waiting_requests_join_running_ones_after_the_delay():
    h = hold()
    assert h.admit(5.0, False, 4.0, PREFILL_S)  # nothing runs
    assert h.admit(5.0, True, None, PREFILL_S)  # nothing waits
    assert not h.admit(5.0, True, 4.75, PREFILL_S)
    assert h.admit(5.25, True, 4.75, PREFILL_S)
    h.delay_factor = 0.0
    assert h.admit(4.75, True, 4.75, PREFILL_S)
