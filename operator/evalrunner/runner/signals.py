"""SIGTERM/SIGINT as a request to stop: cancel in-flight cases, then close the run."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Callable, Iterator

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def shutdown_signals(on_signal: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Route SIGTERM/SIGINT to `on_signal` while the block runs (main thread only).

    Off the main thread (embedded use, tests) signals stay with whoever owns them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(sig)
