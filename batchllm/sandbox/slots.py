"""A self-hosted server's slots: N requests computed at once, the rest waiting in a FIFO queue.

This is how llama.cpp (``--parallel N``) and vLLM (``max_num_seqs``) serve: a request beyond the
slots waits, and the wait counts against the client's timeout. Each request holds its slot for
a fixed number of seconds, whatever it asks for, so a test knows what N slots kept busy take.

What the server saw is counted for tests and the bench: the deepest the queue got, and the
requests whose client was gone by the time their answer was ready (given up: the compute was
wasted, as on a real server).
"""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    """N slots and a FIFO queue in front of them."""

    def __init__(self, slots: int, seconds: float) -> None:
        self.slots = slots
        self.seconds = seconds
        self.busy = 0
        self.max_queue = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    async def serve(self) -> None:
        """Wait for a slot (in arrival order), hold it ``seconds``, free it."""
        if self.busy >= self.slots or self._queue:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append(waiter)
            self.max_queue = max(self.max_queue, len(self._queue))
            try:
                await waiter  # the slot is handed over by the request that frees it
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._free()  # handed a slot and cancelled at once: pass it on
                else:
                    self._queue.remove(waiter)
                raise
        else:
            self.busy += 1
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self._free()

    def _free(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: ``busy`` is unchanged
                return
        self.busy -= 1

    def props(self) -> dict[str, int]:
        """What llama.cpp's ``GET /props`` says of its slots."""
        return {"total_slots": self.slots}
