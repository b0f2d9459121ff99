"""`StopSignals`: SIGTERM / SIGINT during `Trainer.fit` stop the run after the current step, with a checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class StopSignals:
    """SIGTERM / SIGINT during `fit`: the first asks the loop to stop after the current step, with a checkpoint;
    a second one interrupts at once (KeyboardInterrupt). Installed only in the main thread, restored after."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s: finishing this step, then writing a checkpoint (send it again to stop at once)",
                    self.received)
