"""Stopping on SIGTERM/SIGINT without losing work: the first signal asks the training loop to stop
after its step (which it then checkpoints); a second one stops at once.

Cluster schedulers send SIGTERM some time before they kill a job; a user presses Ctrl-C. While a
`GracefulStop` is active the first of these only sets `requested`; the trainer reads it at its next
step, votes with the other ranks (one all-reduce the step already does, so all ranks stop at the
same step), saves a checkpoint and returns. A second signal raises `Interrupted` wherever the
program is: nothing waits for the step, and a checkpoint being written is left as a temporary
folder that the next run removes.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["GracefulStop", "Interrupted"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A second stop signal: stop now. `signum` is the signal (the CLI exits 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} received twice: stopped at once")
        self.signum = signum


class GracefulStop:
    """Context manager that turns the first SIGTERM/SIGINT into a request (`requested`,
    `signal_name`) and a second into `Interrupted`. Outside the main thread (where Python cannot
    install handlers) it installs nothing and never requests a stop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
