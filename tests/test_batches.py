"""The producer–writer queue: bounded in items as well as in messages, per resource."""

from __future__ import annotations

import asyncio

from sync.model.batches import Batch, Failure, MessageQueue, ResourceDone


def _batch(size: int) -> Batch:
    return Batch("attempts", [(ident, {"id": ident}) for ident in range(size)])


async def test_a_put_waits_while_the_queue_holds_its_items_bound() -> None:
    queue = MessageQueue(max_messages=64, max_items=300)
    await queue.put(_batch(200))
    await queue.put(_batch(200))  # 200 held: below the bound, so it goes in (400 held)
    third = asyncio.create_task(queue.put(_batch(200)))
    await asyncio.sleep(0.01)
    assert not third.done(), "a put went in while 400 items were held against a bound of 300"
    first = await queue.get()
    assert isinstance(first, Batch) and len(first.items) == 200
    await asyncio.wait_for(third, 1)  # 200 held now, below the bound: the waiting page goes in
    assert queue.qsize() == 2 and queue.full_for("attempts")


async def test_the_message_bound_still_holds_for_markers() -> None:
    queue = MessageQueue(max_messages=2, max_items=10_000)
    for number in range(2):
        queue.put_nowait(Failure("page", str(number), "failed"))
    assert queue.full_for("failures")
    await queue.get()
    assert not queue.full_for("failures")


async def test_a_message_larger_than_the_item_bound_goes_into_an_empty_queue() -> None:
    queue = MessageQueue(max_messages=64, max_items=50)
    await asyncio.wait_for(queue.put(_batch(200)), 1)
    assert queue.full_for("attempts")
    await queue.get()
    assert not queue.full_for("attempts") and queue.empty()


async def test_a_resource_at_its_bound_does_not_hold_back_another() -> None:
    """Ten pages of attempts waiting for the writer must not stop a user's batches from
    being handed over: the bounds are each resource's own."""
    queue = MessageQueue(max_messages=64, max_items=300)
    await queue.put(_batch(200))
    await queue.put(_batch(200))
    blocked = asyncio.create_task(queue.put(_batch(200)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    for user_id in range(30):  # small messages of another resource go in at once
        await asyncio.wait_for(queue.put(Batch("memberships", [(1, {"id": 1})], parent_id=user_id)), 1)
        await asyncio.wait_for(queue.put(ResourceDone("memberships", "ok", True, {1}, parent_id=user_id)), 1)
    assert not blocked.done() and queue.qsize() == 62
    await queue.get()  # an attempts page taken: the waiting one goes in
    await asyncio.wait_for(blocked, 1)


async def test_attempt_pages_yield_to_other_resources_which_keep_their_order() -> None:
    """The writer takes a user's batches (light, bound by latency) ahead of attempt pages
    queued before them; each resource keeps its own order, and the closing None is last."""
    queue = MessageQueue(max_messages=64, max_items=10_000, yielding=frozenset({"attempts"}))
    first_page, second_page = _batch(200), _batch(200)
    attempts_done = ResourceDone("attempts", "ok", True, set())
    users = Batch("users", [(7, {"id": 7})])
    memberships = Batch("memberships", [(1, {"id": 1})], parent_id=7)
    memberships_done = ResourceDone("memberships", "ok", True, {1}, parent_id=7)
    for message in (first_page, users, second_page, memberships, attempts_done, memberships_done, None):
        await queue.put(message)
    taken = [await queue.get() for _ in range(7)]
    assert taken == [users, memberships, memberships_done, first_page, second_page, attempts_done, None]


async def test_without_yielding_resources_messages_leave_in_the_order_they_came() -> None:
    queue = MessageQueue(max_messages=64, max_items=10_000)
    page, users = _batch(200), Batch("users", [(7, {"id": 7})])
    for message in (page, users, None):
        await queue.put(message)
    assert [await queue.get() for _ in range(3)] == [page, users, None]
