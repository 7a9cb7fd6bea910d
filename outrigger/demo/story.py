"""The scripted story: each step is announced when it starts and records whether its check saw
it happen, and the evidence."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Step:
    title: str
    expect: str  # what the check looks for, in words
    started: float | None = None
    happened: bool | None = None  # None: not run (yet)
    evidence: str = ""
    skipped: bool = False  # not checked: what it shows did not arise (another step failed)

    @property
    def mark(self) -> str:
        if self.skipped:
            return "skipped"
        if self.happened is None:
            return "running" if self.started is not None else "pending"
        return "happened" if self.happened else "DID NOT HAPPEN"


@dataclass
class Story:
    steps: list[Step] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)

    def add(self, title: str, expect: str) -> Step:
        step = Step(title, expect)
        self.steps.append(step)
        return step

    @property
    def current(self) -> Step | None:
        for step in self.steps:
            if step.started is not None and step.happened is None and not step.skipped:
                return step
        return None

    @property
    def all_happened(self) -> bool:
        return bool(self.steps) and all(s.happened or s.skipped for s in self.steps)

    def elapsed(self) -> float:
        return time.monotonic() - self.began
