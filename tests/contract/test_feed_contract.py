"""The feed of every job's Responses (WatchJobs) in the connector contract.

Every connector passes this suite unchanged: the feed holds each stored Response once, in
an order a resumed read never contradicts, filtered by the Response's state and its job's
type, queue, parent and creator; a token resumes exactly after its place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ajs_grpc.connectors import base
from ajs_grpc.connectors.base import Connector, FeedItem, FeedPage, JobFilter
from ajs_grpc.connectors.memory import MemoryConnector
from ajs_grpc.core.errors import InvalidArgument, Unimplemented
from ajs_grpc.core.model import Progress, Request, RequestState, Update
from tests.conftest import CONNECTORS, drop_schema
from tests.helpers import eventually

S = RequestState


async def read_all(
    connector: Connector, after: str, job_filter: JobFilter | None = None, limit: int = 3
) -> tuple[list[FeedItem], str]:
    """Every item after ``after``, a page of ``limit`` at a time; and the place after them."""
    items: list[FeedItem] = []
    while True:
        page = await connector.feed(after, job_filter or JobFilter(), limit)
        items += page.items
        after = page.token
        if not page.more:
            return items, after


def seen(items: list[FeedItem]) -> list[tuple[str, int, RequestState]]:
    return [(item.response.request_id, item.response.sequence, item.response.state) for item in items]


async def run_job(connector: Connector, request_id: str, *progress: float) -> None:
    """Claims ``request_id`` (the only claimable job), reports ``progress``, finishes it."""
    (claim,) = await connector.claim("w", limit=1)
    assert claim.job.request.id == request_id
    for fraction in progress:
        await connector.respond(request_id, Update(S.PENDING, progress=Progress(fraction)), claim.lease_token)
    await connector.respond(request_id, Update(S.FINISHED, data={"ok": "1"}), claim.lease_token)


async def test_the_feed_starts_now_and_holds_every_response_once_in_order(connector: Connector) -> None:
    await connector.enqueue(Request(id="before", type="t"))
    start = (await connector.feed("", JobFilter(), 0)).token
    await run_job(connector, "before", 0.5)
    await connector.enqueue(Request(id="after", type="t"))
    items, _ = await read_all(connector, start)
    # Nothing stored before "now"; then the Responses in the order they were stored.
    assert seen(items) == [
        ("before", 2, S.PENDING),
        ("before", 3, S.PENDING),
        ("before", 4, S.FINISHED),
        ("after", 1, S.CREATED),
    ]
    assert items[2].response.data == {"ok": "1"}
    assert items[1].response.progress == Progress(0.5)
    assert {(item.type, item.queue) for item in items} == {("t", "default")}


async def test_each_items_token_resumes_right_after_it(connector: Connector) -> None:
    start = (await connector.feed("", JobFilter(), 0)).token
    for index in range(4):
        await connector.enqueue(Request(id=f"j{index}", type="t"))
    items, end = await read_all(connector, start, limit=10)
    assert [item.response.request_id for item in items] == ["j0", "j1", "j2", "j3"]
    for index, item in enumerate(items):
        rest, _ = await read_all(connector, item.token)
        assert seen(rest) == seen(items[index + 1 :])
    # The place after a whole read: nothing more until something is stored.
    assert (await connector.feed(end, JobFilter(), 10)).items == []
    await connector.enqueue(Request(id="j4", type="t"))
    assert [item.response.request_id for item in (await connector.feed(end, JobFilter(), 10)).items] == ["j4"]


async def test_a_page_stops_at_its_limit_and_says_more(connector: Connector) -> None:
    start = (await connector.feed("", JobFilter(), 0)).token
    for index in range(5):
        await connector.enqueue(Request(id=f"j{index}", type="t"))
    page = await connector.feed(start, JobFilter(), 2)
    assert [item.response.request_id for item in page.items] == ["j0", "j1"]
    assert page.more
    assert page.token == page.items[-1].token
    items, _ = await read_all(connector, page.token, limit=2)
    assert [item.response.request_id for item in items] == ["j2", "j3", "j4"]


async def test_filters_match_the_responses_state_and_the_jobs_fields(connector: Connector) -> None:
    start = (await connector.feed("", JobFilter(), 0)).token
    await connector.enqueue(Request(id="p", type="parent"))
    await connector.enqueue(Request(id="c", type="child", parent_id="p", queue="q2", creator="alice"))
    await connector.enqueue(Request(id="o", type="other", creator="bob"))
    await run_job(connector, "p")

    async def ids(job_filter: JobFilter) -> list[tuple[str, int]]:
        items, _ = await read_all(connector, start, job_filter)
        return [(item.response.request_id, item.response.sequence) for item in items]

    assert await ids(JobFilter(states=frozenset({S.FINISHED}))) == [("p", 3)]
    assert await ids(JobFilter(states=frozenset({S.CREATED}))) == [("p", 1), ("c", 1), ("o", 1)]
    assert await ids(JobFilter(types=frozenset({"child", "other"}))) == [("c", 1), ("o", 1)]
    assert await ids(JobFilter(queues=frozenset({"q2"}))) == [("c", 1)]
    assert await ids(JobFilter(queues=frozenset({"default"}))) == [("p", 1), ("o", 1), ("p", 2), ("p", 3)]
    assert await ids(JobFilter(parent_id="p")) == [("c", 1)]
    assert await ids(JobFilter(creator="bob")) == [("o", 1)]
    assert await ids(JobFilter(creator="bob", types=frozenset({"child"}))) == []
    items, _ = await read_all(connector, start, JobFilter(queues=frozenset({"q2"})))
    assert (items[0].type, items[0].queue) == ("child", "q2")


async def test_a_filtered_read_moves_past_what_it_skipped(connector: Connector) -> None:
    start = (await connector.feed("", JobFilter(), 0)).token
    for index in range(5):
        await connector.enqueue(Request(id=f"x{index}", type="skipped"))
    only = JobFilter(types=frozenset({"wanted"}))
    page = await connector.feed(start, only, 10)
    assert page.items == []
    assert not page.more
    await connector.enqueue(Request(id="w", type="wanted"))
    # From the place the empty read reached, the new one comes (and none of the skipped).
    assert [item.response.request_id for item in (await connector.feed(page.token, only, 10)).items] == ["w"]


async def test_deleted_jobs_leave_the_feed_and_numbers_are_not_given_again(connector: Connector) -> None:
    start = (await connector.feed("", JobFilter(), 0)).token
    await connector.enqueue(Request(id="a", type="t"))
    await connector.enqueue(Request(id="b", type="t"))
    await run_job(connector, "a")
    await run_job(connector, "b")
    items, end = await read_all(connector, start)
    assert len(items) == 6
    await connector.delete("b")  # the newest Responses go
    await connector.enqueue(Request(id="c", type="t"))
    # A client that had read everything sees the new one (its place was not given again).
    assert [item.response.request_id for item in (await read_all(connector, end))[0]] == ["c"]
    assert [item.response.request_id for item in (await read_all(connector, start))[0]] == ["a", "a", "a", "c"]


async def test_a_token_of_another_kind_is_refused(connector: Connector) -> None:
    for token in ["nonsense", "x1.2.3", "s1.2", "p-1.0.0", "m.5", "s\u0661.0.0", "p" + "9" * 30 + ".0.0"]:
        with pytest.raises(InvalidArgument) as refused:
            await connector.feed(token, JobFilter(), 10)
        assert refused.value.reason == "BAD_RESUME_TOKEN"
        assert refused.value.violations[0].field == "after_token"


async def test_watch_jobs_streams_live_after_a_bookmark(connector: Connector) -> None:
    got: list[FeedItem | str] = []
    stream: AsyncIterator[FeedItem | str] = connector.watch_jobs(JobFilter(types=frozenset({"t"})))

    async def follow() -> None:
        async for event in stream:
            got.append(event)

    task = asyncio.create_task(follow())
    try:
        await eventually(lambda: len(got) == 1)
        assert isinstance(got[0], str)  # the bookmark of "now"
        await connector.enqueue(Request(id="other", type="u"))
        await connector.enqueue(Request(id="live", type="t"))
        await run_job(connector, "other")
        await run_job(connector, "live", 0.5)
        await eventually(lambda: len(got) == 5)
        items = [event for event in got if isinstance(event, FeedItem)]
        assert seen(items) == [
            ("live", 1, S.CREATED),
            ("live", 2, S.PENDING),
            ("live", 3, S.PENDING),
            ("live", 4, S.FINISHED),
        ]
        # Resuming from the bookmark gives the same items.
        assert isinstance(got[0], str)
        resumed, _ = await read_all(connector, got[0], JobFilter(types=frozenset({"t"})))
        assert seen(resumed) == seen(items)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_token_of_another_store_of_the_same_kind_is_refused(
    connector: Connector, connector_name: str, tmp_path: Path
) -> None:
    # A database made again (or another instance's in-memory queue) gives tokens of its own.
    other = CONNECTORS[connector_name](tmp_path / "other")
    (tmp_path / "other").mkdir()
    await other.open()
    try:
        foreign = (await other.feed("", JobFilter(), 0)).token
    finally:
        await other.close()
        if isinstance(schema := getattr(other, "schema", None), str):
            drop_schema(schema)
    with pytest.raises(InvalidArgument) as refused:
        await connector.feed(foreign, JobFilter(), 10)
    assert refused.value.reason == "BAD_RESUME_TOKEN"


async def test_a_cancelled_stream_stops_while_responses_keep_coming(connector: Connector) -> None:
    # Every stored Response wakes every stream: a cancel that comes in the same loop turn
    # must still end the stream (and free its slot), not be swallowed by the wake-up.
    async def follow() -> None:
        async for _ in connector.watch_jobs(JobFilter(types=frozenset({"other"}))):
            pass

    followers = [asyncio.create_task(follow()) for _ in range(20)]
    await eventually(lambda: connector._feed_tail is not None and connector._feed_tail.users == 20)
    stop = asyncio.Event()

    async def produce() -> None:
        index = 0
        while not stop.is_set():
            await connector.enqueue(Request(id=f"j{index}", type="t"))
            index += 1
            await asyncio.sleep(0)  # the memory connector never awaits: let the followers run

    producer = asyncio.create_task(produce())
    try:
        await eventually(lambda: connector._feed_announced > 20)
        for follower in followers:
            follower.cancel()
        _, running = await asyncio.wait(followers, timeout=5)
        assert not running
        assert not connector._feed_watchers
    finally:
        stop.set()
        await producer


async def test_a_connector_plugin_without_a_feed_answers_unimplemented() -> None:
    # Connectors written before the feed still load; WatchJobs on them is UNIMPLEMENTED.
    with pytest.raises(Unimplemented) as refused:
        await Connector.feed(MemoryConnector(), "", JobFilter(), 0)
    assert refused.value.reason == "FEED_NOT_SUPPORTED"


async def test_streams_at_one_place_with_one_filter_share_their_reads(connector: Connector) -> None:
    reads = 0
    feed = connector.feed

    async def counted(after: str, job_filter: JobFilter, limit: int) -> FeedPage:
        nonlocal reads
        reads += limit > 0
        return await feed(after, job_filter, limit)

    connector.feed = counted  # type: ignore[method-assign]
    got: list[list[FeedItem]] = [[] for _ in range(20)]

    async def follow(into: list[FeedItem]) -> None:
        async for event in connector.watch_jobs(JobFilter(types=frozenset({"t"}))):
            if isinstance(event, FeedItem):
                into.append(event)

    followers = [asyncio.create_task(follow(into)) for into in got]
    try:
        await eventually(
            lambda: (
                connector._feed_tail is not None and connector._feed_tail.users == 20 and connector._feed_tail.started
            )
        )
        before = reads
        await connector.enqueue(Request(id="one", type="t"))
        await eventually(lambda: all(len(into) == 1 for into in got))
        assert reads - before < 10  # a few shared reads (wake-ups from two sources), not one per stream
    finally:
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)


async def test_streams_with_different_filters_share_one_reader(connector: Connector) -> None:
    reads = 0
    feed = connector.feed

    async def counted(after: str, job_filter: JobFilter, limit: int) -> FeedPage:
        nonlocal reads
        reads += limit > 0
        return await feed(after, job_filter, limit)

    connector.feed = counted  # type: ignore[method-assign]
    got: dict[str, list[FeedItem]] = {f"t{index}": [] for index in range(20)}

    async def follow(request_type: str) -> None:
        async for event in connector.watch_jobs(JobFilter(types=frozenset({request_type}))):
            if isinstance(event, FeedItem):
                got[request_type].append(event)

    followers = [asyncio.create_task(follow(request_type)) for request_type in got]
    try:
        await eventually(lambda: connector._feed_tail is not None and connector._feed_tail.users == 20)
        await eventually(lambda: connector._feed_tail is not None and connector._feed_tail.started)
        before = reads
        await connector.enqueue(Request(id="one", type="t7"))
        await eventually(lambda: len(got["t7"]) == 1)
        assert reads - before < 10  # one reader for all of them, not one read per stream
        assert all(not items for request_type, items in got.items() if request_type != "t7")
    finally:
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)


async def test_a_stream_behind_what_the_tail_keeps_catches_up_from_the_store(
    connector: Connector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "FEED_TAIL_KEEP", 4)  # the tail forgets all but the newest few
    start = (await connector.feed("", JobFilter(), 0)).token
    live: list[FeedItem] = []

    async def follow(into: list[FeedItem], after: str) -> None:
        async for event in connector.watch_jobs(JobFilter(), after):
            if isinstance(event, FeedItem):
                into.append(event)

    first = asyncio.create_task(follow(live, ""))
    late: list[FeedItem] = []
    second: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: connector._feed_tail is not None and connector._feed_tail.started)
        for index in range(20):
            await connector.enqueue(Request(id=f"j{index}", type="t"))
        await eventually(lambda: len(live) == 20)
        second = asyncio.create_task(follow(late, start))  # from before all of them
        await eventually(lambda: len(late) == 20)
        await connector.enqueue(Request(id="j20", type="t"))
        await eventually(lambda: len(late) == 21 and len(live) == 21)
        assert [item.response.request_id for item in late] == [f"j{index}" for index in range(21)]
        assert [item.token for item in late] == [item.token for item in live]
    finally:
        for task in (first, second):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (first, second) if t is not None), return_exceptions=True)
