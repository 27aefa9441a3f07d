"""The dynamic batcher's wait: clients of one call that come back one by one are merged again, and a lone client
waits no longer than the window."""

from __future__ import annotations

import asyncio
import time

from distillery.serving.batching import Batcher


def _model(calls: list):
    def run(key, items):
        calls.append(len(items))
        time.sleep(0.05)  # one model call, whatever the batch size (the batched call's whole point)
        return [x * 2 for x in items]
    return run


def test_clients_coming_back_one_by_one_are_merged_into_full_calls():
    calls: list[int] = []

    async def main():
        batcher = Batcher(_model(calls), max_items=8, window_s=0.01)

        async def client(k: int):
            for r in range(5):
                assert await batcher.submit("k", [k * 100 + r]) == [2 * (k * 100 + r)]
                await asyncio.sleep(0.003 * k)  # reading the answer takes each client a different time

        await asyncio.gather(*(client(k) for k in range(8)))

    asyncio.run(main())
    assert sum(calls) == 40
    # A fixed 10 ms window splits each round into a call of the first four and one of the rest; waiting for
    # as many items as the last call held (at most half a call) keeps the calls full after the first round.
    assert len(calls) <= 7, calls


def test_a_lone_client_waits_no_longer_than_the_window():
    calls: list[int] = []

    async def main():
        batcher = Batcher(_model(calls), max_items=8, window_s=0.01)
        await asyncio.gather(*(batcher.submit("k", [k]) for k in range(8)))  # a burst: the last call held 8
        lat = []
        for k in range(4):
            t = time.perf_counter()
            await batcher.submit("k", [k])
            lat.append(time.perf_counter() - t)
        return lat

    lat = asyncio.run(main())
    assert calls == [8, 1, 1, 1, 1]
    # Right after the burst one request waits for the stragglers (at most half a call, 25 ms); then the last call
    # held one item and nothing waits beyond the 10 ms window.
    assert lat[0] < 0.05 + 0.025 + 0.05, lat
    assert max(lat[1:]) < 0.05 + 0.01 + 0.03, lat
