"""Hold a Drafter's engine thread inside a proposal, so later calls queue up behind it (deterministic batches)."""
from __future__ import annotations

import threading


class ProposeGate:
    def __init__(self, drafter):
        self.entered, self._open = threading.Event(), threading.Event()
        propose = drafter.proposer.propose

        def held(requests):
            self.entered.set()
            self._open.wait(30)
            return propose(requests)
        drafter.proposer.propose = held

    def wait_entered(self) -> None:
        """Block until the engine thread is inside a proposal (and so is not taking queued calls)."""
        assert self.entered.wait(30), "the drafter never started a proposal"

    def release(self) -> None:
        self._open.set()
