"""The check's console lines and its time budget: a section starts only before the deadline, and
one that does not leaves a note in the report (a device loan ends on the clock, not on our terms)."""

from __future__ import annotations

import time


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


class Budget:
    def __init__(self, deadline: float, notes: list[str]):
        self.deadline = deadline
        self.notes = notes  # the report's notes: shared, so skips show up there as they happen
        self.skipped = 0

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(text)

    def allows(self, section: str) -> bool:
        """Whether ``section`` may start; if not, say so in the notes."""
        if time.time() <= self.deadline:
            return True
        self.skipped += 1
        self.note(f"{section}: skipped, out of time budget")
        return False
