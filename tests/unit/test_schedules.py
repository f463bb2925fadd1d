"""Schedules in the core: checking, occurrences (seconds, time zones, DST), occurrence ids, planning."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from ajs_grpc.core.errors import InvalidArgument
from ajs_grpc.core.model import Request
from ajs_grpc.core.schedules import (
    LATE_GRACE,
    MAX_SCHEDULE_ID_LENGTH,
    MAX_SUBMITS_PER_PLAN,
    Catchup,
    Overlap,
    Plan,
    Schedule,
    check_schedule,
    occurrence_id,
    plan,
)

BERLIN = ZoneInfo("Europe/Berlin")
TEMPLATE = Request(id="", type="report", data={"kind": "daily"}, priority=3, queue="reports", max_attempts=2)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def berlin(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=BERLIN, fold=fold)  # type: ignore[misc]


def schedule(cron: str, time_zone: str = "UTC", **fields: object) -> Schedule:
    return Schedule(id="nightly", cron=cron, template=TEMPLATE, time_zone=time_zone, **fields)  # type: ignore[arg-type]


def between(s: Schedule, after: datetime, until: datetime) -> list[datetime]:
    return list(s.occurrences(after, until))


# -- check_schedule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "time_zone"),
    [
        ("*/5 * * * *", "UTC"),
        ("30 2 * * 1-5", "Europe/Berlin"),
        ("0 0 L * *", "America/New_York"),
        ("*/10 * * * * *", "Asia/Tokyo"),  # seconds first
        ("0 9 * * MON#1", ""),  # empty: UTC
    ],
)
def test_valid_schedules_pass(cron: str, time_zone: str) -> None:
    check_schedule(schedule(cron, time_zone))


@pytest.mark.parametrize("cron", ["* * * *", "* * * * * * *", "", "0 0 1 1 * 2030 x"])
def test_a_wrong_number_of_fields_is_refused_naming_both_forms(cron: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_schedule(schedule(cron))
    assert raised.value.reason == "INVALID_FIELDS"
    [violation] = raised.value.violations
    assert violation.field == "schedule.cron"
    assert f"has {len(cron.split())} fields" in violation.description
    assert "5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first" in violation.description


@pytest.mark.parametrize(
    ("cron", "says"),
    [
        ("61 * * * *", "Bad minute"),
        ("* 24 * * *", "Bad hour"),
        ("* * 0 * *", "Bad day-of-month"),
        ("* * * 13 *", "Bad month"),
        ("* * * * 8", "Bad day-of-week"),
        ("60 * * * * *", "Bad second"),
        ("0 0 30 2 *", "Bad day-of-month"),  # no February has a 30th
        ("every day", "has 2 fields"),
    ],
)
def test_a_bad_cron_expression_is_refused_saying_why(cron: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_schedule(schedule(cron))
    [violation] = raised.value.violations
    assert violation.field == "schedule.cron"
    assert says in violation.description
    assert "or 6 with seconds first" in violation.description


def test_an_expression_that_names_no_time_is_refused() -> None:
    # The 1st and 21st of a month, if it is also the month's last Monday: never.
    with pytest.raises(InvalidArgument) as raised:
        check_schedule(schedule("* * */20 * 1L"))
    [violation] = raised.value.violations
    assert violation.field == "schedule.cron"
    assert "names no time" in violation.description
    assert schedule("* * */20 * 1L").next_time(utc(2026, 1, 1)) is None


@pytest.mark.parametrize(
    "zone",
    ["Mars/Olympus_Mons", "Europe/berlin ", "Europe", "../etc/passwd", "/etc/localtime", "localtime", "zone.tab"],
)
def test_an_unknown_time_zone_is_refused(zone: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_schedule(schedule("0 * * * *", zone))
    [violation] = raised.value.violations
    assert violation.field == "schedule.time_zone"
    assert "is not an IANA time zone" in violation.description


def test_both_bad_fields_are_named_at_once() -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_schedule(schedule("61 * * * *", "Nowhere/City"))
    assert [v.field for v in raised.value.violations] == ["schedule.cron", "schedule.time_zone"]
    assert "schedule.cron" in raised.value.message


def test_the_longest_id_gives_occurrence_ids_within_a_request_ids_limit() -> None:
    longest = "x" * MAX_SCHEDULE_ID_LENGTH
    assert len(occurrence_id(longest, utc(2026, 12, 31, 23, 59, 59))) <= 128


# -- occurrences -----------------------------------------------------------------------


def test_occurrences_are_after_exclusive_until_inclusive_aware_utc() -> None:
    s = schedule("*/15 * * * *")
    found = between(s, utc(2026, 5, 1, 10, 0), utc(2026, 5, 1, 11, 0))
    assert found == [utc(2026, 5, 1, 10, 15), utc(2026, 5, 1, 10, 30), utc(2026, 5, 1, 10, 45), utc(2026, 5, 1, 11, 0)]
    assert all(t.tzinfo is UTC for t in found)


def test_occurrences_with_a_seconds_field() -> None:
    s = schedule("*/20 * * * * *")
    found = between(s, utc(2026, 5, 1, 10, 0, 50), utc(2026, 5, 1, 10, 1, 40))
    assert found == [utc(2026, 5, 1, 10, 1, 0), utc(2026, 5, 1, 10, 1, 20), utc(2026, 5, 1, 10, 1, 40)]
    assert schedule("30 15 10 * * *").next_time(utc(2026, 5, 1)) == utc(2026, 5, 1, 10, 15, 30)


def test_next_time_reads_the_schedules_time_zone_and_takes_any_aware_after() -> None:
    s = schedule("0 9 * * *", "America/New_York")
    # 09:00 in New York in May is 13:00 UTC (EDT, -4).
    assert s.next_time(utc(2026, 5, 1, 12, 0)) == utc(2026, 5, 1, 13, 0)
    assert s.next_time(berlin(2026, 5, 1, 15, 0)) == utc(2026, 5, 2, 13, 0)  # 13:00 UTC was passed
    assert s.next_time(utc(2026, 5, 1, 13, 0)) == utc(2026, 5, 2, 13, 0)  # after is exclusive
    with pytest.raises(ValueError, match="naive"):
        s.next_time(datetime(2026, 5, 1))


def test_microseconds_do_not_shift_occurrences() -> None:
    s = schedule("* * * * * *")
    assert s.next_time(utc(2026, 5, 1, 10, 0, 0) + timedelta(microseconds=999_999)) == utc(2026, 5, 1, 10, 0, 1)


# -- daylight saving time, Europe/Berlin 2026 -----------------------------------------
# Spring: 2026-03-29 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:00-03:00 does not exist.
# Autumn: 2026-10-25 03:00 CEST goes back to 02:00 CET (01:00 UTC); 02:00-03:00 happens twice.


def test_spring_gap_a_daily_time_in_the_gap_runs_once_at_the_end_of_the_gap() -> None:
    s = schedule("30 2 * * *", "Europe/Berlin")
    found = between(s, utc(2026, 3, 27), utc(2026, 3, 31))
    assert found == [
        utc(2026, 3, 27, 1, 30),  # 02:30 CET
        utc(2026, 3, 28, 1, 30),
        utc(2026, 3, 29, 1, 0),  # 02:30 does not exist: 03:00 CEST, the first instant after the gap
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]
    assert found[2].astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CEST"


def test_spring_gap_several_times_in_the_gap_run_once_and_later_ones_still_run() -> None:
    s = schedule("0,30 2,3 * * *", "Europe/Berlin")
    found = between(s, utc(2026, 3, 29, 0, 0), utc(2026, 3, 29, 2, 0))
    # 02:00 and 02:30 both fall in the gap and run together at 03:00 CEST, which is also
    # a time of the expression: one occurrence. Then 03:30 CEST.
    assert found == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 1, 30)]


def test_spring_gap_same_rule_with_a_seconds_field() -> None:
    s = schedule("0 30 2 * * *", "Europe/Berlin")
    assert between(s, utc(2026, 3, 28, 12), utc(2026, 3, 30, 12)) == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]


def test_spring_gap_an_interval_expression_skips_the_times_that_do_not_exist() -> None:
    s = schedule("*/15 * * * *", "Europe/Berlin")
    found = between(s, berlin(2026, 3, 29, 1, 30), berlin(2026, 3, 29, 3, 30))
    assert [t.astimezone(BERLIN).strftime("%H:%M") for t in found] == ["01:45", "03:00", "03:15", "03:30"]
    assert found[1] - found[0] == timedelta(minutes=15)  # 15 minutes of time, as every other step


def test_autumn_repeat_a_daily_time_in_the_repeated_hour_runs_once_at_its_first_pass() -> None:
    s = schedule("30 2 * * *", "Europe/Berlin")
    found = between(s, utc(2026, 10, 24), utc(2026, 10, 27))
    assert found == [
        utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST, the first pass; not 01:30 UTC (02:30 CET) as well
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
    ]


def test_autumn_repeat_resuming_inside_the_repeated_hour_does_not_run_the_daily_time_again() -> None:
    s = schedule("30 2 * * *", "Europe/Berlin")
    # A scheduler that handled up to 02:15 CET (the second pass) goes on to the next day.
    assert s.next_time(berlin(2026, 10, 25, 2, 15, fold=1)) == utc(2026, 10, 26, 1, 30)
    # One that handled up to 02:15 CEST (the first pass) still has 02:30 CEST ahead.
    assert s.next_time(berlin(2026, 10, 25, 2, 15, fold=0)) == utc(2026, 10, 25, 0, 30)


def test_autumn_repeat_same_rule_with_a_seconds_field() -> None:
    s = schedule("0 30 2 * * *", "Europe/Berlin")
    assert between(s, utc(2026, 10, 24, 12), utc(2026, 10, 26, 12)) == [
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 26, 1, 30),
    ]


def test_autumn_repeat_an_interval_expression_runs_on_both_passes_with_distinct_ids() -> None:
    s = schedule("*/15 * * * *", "Europe/Berlin")
    found = between(s, berlin(2026, 10, 25, 1, 50), berlin(2026, 10, 25, 3, 0))
    walls = [t.astimezone(BERLIN).strftime("%H:%M %Z") for t in found]
    assert walls == [
        "02:00 CEST", "02:15 CEST", "02:30 CEST", "02:45 CEST",
        "02:00 CET", "02:15 CET", "02:30 CET", "02:45 CET",
        "03:00 CET",
    ]  # fmt: skip
    assert [t - found[0] for t in found] == [timedelta(minutes=15 * i) for i in range(9)]
    ids = [occurrence_id("nightly", t) for t in found]
    assert len(set(ids)) == len(ids)
    assert ids[2] == "nightly@20261025T003000Z"  # 02:30 CEST
    assert ids[6] == "nightly@20261025T013000Z"  # 02:30 CET


def test_autumn_repeat_resuming_inside_the_second_pass_goes_on_with_it() -> None:
    s = schedule("*/15 * * * *", "Europe/Berlin")
    assert s.next_time(berlin(2026, 10, 25, 2, 20, fold=1)) == utc(2026, 10, 25, 1, 30)  # 02:30 CET
    assert s.next_time(berlin(2026, 10, 25, 2, 50, fold=0)) == utc(2026, 10, 25, 1, 0)  # 02:00 CET


def test_an_hourly_expression_runs_on_both_passes_of_the_repeated_hour() -> None:
    s = schedule("30 * * * *", "Europe/Berlin")  # the hour field starts with "*": by elapsed time
    found = between(s, berlin(2026, 10, 25, 1, 0), berlin(2026, 10, 25, 4, 0))
    assert found == [
        utc(2026, 10, 24, 23, 30),
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 25, 1, 30),
        utc(2026, 10, 25, 2, 30),
    ]


# -- occurrence ids and requests ---------------------------------------------------------


def test_occurrence_id_is_the_schedule_id_and_the_utc_time() -> None:
    assert occurrence_id("nightly", utc(2026, 3, 29, 1, 0)) == "nightly@20260329T010000Z"
    assert occurrence_id("nightly", berlin(2026, 3, 29, 3, 0)) == "nightly@20260329T010000Z"
    assert occurrence_id("~alice/tick", utc(2026, 1, 2, 3, 4, 5)) == "~alice/tick@20260102T030405Z"
    with pytest.raises(ValueError, match="naive"):
        occurrence_id("nightly", datetime(2026, 3, 29, 1, 0))


def test_request_for_an_occurrence_is_the_template_with_its_id_and_the_creator() -> None:
    s = dataclasses.replace(schedule("0 * * * *"), creator="alice")
    at = utc(2026, 5, 1, 10)
    request = s.request_for(at)
    assert request.id == "nightly@20260501T100000Z"
    assert request.creator == "alice"
    assert (request.type, dict(request.data), request.priority, request.queue, request.max_attempts) == (
        "report",
        {"kind": "daily"},
        3,
        "reports",
        2,
    )
    again = s.request_for(berlin(2026, 5, 1, 12))
    assert again == request
    assert again.same_content(request)
    assert s.request_for(utc(2026, 5, 1, 11)).id != request.id


# -- plan ----------------------------------------------------------------------------------

CREATED = utc(2026, 5, 1, 10, 0, 0)


def every_minute(overlap: Overlap = Overlap.ALLOW, catchup: Catchup = Catchup.SKIP, **fields: object) -> Schedule:
    return schedule("* * * * *", overlap=overlap, catchup=catchup, create_time=CREATED, **fields)


def minute(n: int, second: int = 0) -> datetime:
    return CREATED + timedelta(minutes=n, seconds=second)


def test_nothing_due_plans_nothing() -> None:
    assert plan(every_minute(), minute(0, 59), previous_running=False) == Plan()
    assert plan(every_minute(last_time=minute(3)), minute(3, 30), previous_running=False) == Plan()
    assert plan(every_minute(), minute(0) - timedelta(hours=1), previous_running=False) == Plan()  # a clock behind


def test_occurrences_after_create_time_are_due_before_the_first() -> None:
    assert plan(every_minute(), minute(1), previous_running=False) == Plan([minute(1)], False, minute(1))


def test_on_time_occurrences_are_all_submitted() -> None:
    s = every_minute(last_time=minute(1))
    # Due: minutes 2 and 3; at 3:10 both are at most 70 s late: on time with a grace of 80 s.
    assert plan(s, minute(3, 10), previous_running=False, grace=80) == Plan([minute(2), minute(3)], False, minute(3))


def test_lateness_up_to_grace_is_on_time() -> None:
    s = every_minute(last_time=minute(1))
    assert plan(s, minute(2, int(LATE_GRACE)), previous_running=False).submit == [minute(2)]
    assert plan(s, minute(2, int(LATE_GRACE) + 1), previous_running=False).submit == []


def test_catchup_skip_drops_missed_occurrences_and_moves_on() -> None:
    s = every_minute(last_time=minute(1), catchup=Catchup.SKIP)
    # Down from minute 1 to 10:05: minutes 2..9 are missed, 10 is 5 s late (on time).
    assert plan(s, minute(10, 5), previous_running=False) == Plan([minute(10)], False, minute(10))
    # All of them missed: nothing submitted, all handled.
    assert plan(s, minute(10, 30), previous_running=False) == Plan([], False, minute(10))


def test_catchup_one_submits_the_latest_missed_occurrence() -> None:
    s = every_minute(last_time=minute(1), catchup=Catchup.ONE)
    assert plan(s, minute(10, 5), previous_running=False) == Plan([minute(9), minute(10)], False, minute(10))
    assert plan(s, minute(10, 30), previous_running=False) == Plan([minute(10)], False, minute(10))


def test_catchup_one_after_a_week_down_of_a_schedule_every_second_is_quick() -> None:
    s = dataclasses.replace(
        every_minute(last_time=minute(0), catchup=Catchup.ONE), cron="* * * * * *"
    )  # 600 000 occurrences missed
    at = minute(7 * 24 * 60) + timedelta(microseconds=500_000)
    started = time.perf_counter()
    p = plan(s, at, previous_running=False)
    assert time.perf_counter() - started < 1.0
    # 15.5 s late is missed; the 15 later ones are on time.
    assert p.submit == [at - timedelta(seconds=15.5)] + [
        minute(7 * 24 * 60) - timedelta(seconds=14 - i) for i in range(15)
    ]
    assert p.new_last_time == minute(7 * 24 * 60)


def test_overlap_skip_submits_nothing_while_the_previous_job_runs_but_counts_them_handled() -> None:
    s = every_minute(overlap=Overlap.SKIP, last_time=minute(1), last_job_id="nightly@x")
    assert plan(s, minute(2), previous_running=True) == Plan([], False, minute(2))
    assert plan(s, minute(2), previous_running=False) == Plan([minute(2)], False, minute(2))


def test_overlap_skip_submits_the_first_of_several_due() -> None:
    s = every_minute(overlap=Overlap.SKIP, last_time=minute(1))
    assert plan(s, minute(3), previous_running=False, grace=80) == Plan([minute(2)], False, minute(3))
    caught_up = dataclasses.replace(s, catchup=Catchup.ONE)
    assert plan(caught_up, minute(10, 5), previous_running=False) == Plan([minute(9)], False, minute(10))


def test_overlap_cancel_previous_cancels_a_running_job_and_submits_the_latest() -> None:
    s = every_minute(overlap=Overlap.CANCEL_PREVIOUS, last_time=minute(1), last_job_id="nightly@x")
    assert plan(s, minute(3), previous_running=True, grace=80) == Plan([minute(3)], True, minute(3))
    assert plan(s, minute(3), previous_running=False, grace=80) == Plan([minute(3)], False, minute(3))
    # Only missed ones, dropped by catch-up: nothing to cancel for.
    assert plan(s, minute(10, 30), previous_running=True) == Plan([], False, minute(10))
    caught_up = dataclasses.replace(s, catchup=Catchup.ONE)
    assert plan(caught_up, minute(10, 30), previous_running=True) == Plan([minute(10)], True, minute(10))


def test_overlap_allow_submits_while_the_previous_job_runs() -> None:
    s = every_minute(overlap=Overlap.ALLOW, last_time=minute(1))
    assert plan(s, minute(2), previous_running=True) == Plan([minute(2)], False, minute(2))


def test_a_paused_schedule_plans_nothing() -> None:
    s = every_minute(last_time=minute(1), paused=True)
    assert plan(s, minute(30), previous_running=False) == Plan()


def test_allow_submits_at_most_the_cap_and_leaves_the_rest_for_the_next_plan() -> None:
    s = dataclasses.replace(every_minute(last_time=minute(0)), cron="* * * * * *")
    at = minute(10)  # 600 occurrences, all on time with a grace of an hour
    first = plan(s, at, previous_running=False, grace=3600)
    assert len(first.submit) == MAX_SUBMITS_PER_PLAN
    assert first.submit[0] == minute(0, 1)
    assert first.new_last_time == first.submit[-1] == minute(0, MAX_SUBMITS_PER_PLAN)
    assert first.more
    second = plan(dataclasses.replace(s, last_time=first.new_last_time), at, previous_running=False, grace=3600)
    assert second.submit[0] == minute(0, MAX_SUBMITS_PER_PLAN + 1)
    assert not plan(s, minute(1), previous_running=False, grace=3600).more  # 60: under the cap


def test_plan_follows_dst_rules() -> None:
    s = dataclasses.replace(
        schedule("30 2 * * *", "Europe/Berlin", create_time=utc(2026, 3, 28, 12)), overlap=Overlap.ALLOW
    )
    assert plan(s, utc(2026, 3, 29, 1, 0, 5), previous_running=False).submit == [utc(2026, 3, 29, 1, 0)]
    autumn = dataclasses.replace(s, create_time=utc(2026, 10, 25, 0, 31))  # just after the first 02:30
    assert plan(autumn, utc(2026, 10, 25, 1, 30, 5), previous_running=False) == Plan()  # no second 02:30
