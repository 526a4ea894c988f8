"""Alerts: a small JSON body POSTed to the webhooks of ``monitor.alert`` (InternLM's keys) on run events.

Events (rank 0 sends them): ``start``, ``restart`` (a start under torchrun with ``TORCHELASTIC_RESTART_COUNT`` > 0),
``stop`` (the run ended; ``status`` is its exit status, ``reason`` why), ``unhealthy`` (a health decision other than
continue: a stop or a rollback, internlm.train.health) and ``hang`` (the watchdog fired, internlm.train.watchdog).
The body carries the text both as Feishu's ``{"msg_type": "text", "content": {"text": ...}}`` and as Slack's
``{"text": ...}``, plus the fields ``event``, ``job``, ``host``, ``rank``, ``time`` and the event's own.

Delivery is in a background thread with a short timeout (`TIMEOUT_S`) per request, so a slow or dead webhook
never delays a step; a failure is warned about once (stderr) and never stops training. `close` waits a bounded
time for what is queued (the ``stop`` event) before the process exits.
"""

from __future__ import annotations

import json
import queue
import socket
import sys
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional

TIMEOUT_S = 5.0  # per request: a webhook that does not answer in this time is counted as failed


def alert_body(event: str, job: str, rank: int, text: str, fields: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON body of one alert (see the module docstring)."""
    host = socket.gethostname()
    line = f"[{job}] {event}: {text}"
    body: Dict[str, Any] = dict(msg_type="text", content=dict(text=line), text=line)
    body.update(event=event, job=job, host=host, rank=rank, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    body.update(fields)
    return body


class Alerts:
    """POSTs alerts to ``webhooks`` (URLs; none: every method is a no-op) from rank 0 (``enabled``)."""

    def __init__(self, webhooks: List[str], job: str, rank: int, enabled: bool) -> None:
        self.webhooks = list(webhooks) if enabled else []
        self.job = job
        self.rank = rank
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._warned = False
        self._thread: Optional[threading.Thread] = None

    def send(self, event: str, text: str, **fields: Any) -> None:
        """Queue ``event`` (its one-line ``text`` and ``fields``) for every webhook; returns at once."""
        if not self.webhooks:
            return
        body = json.dumps(alert_body(event, self.job, self.rank, text, fields), default=str).encode()
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver, name="internlm-alerts", daemon=True)
            self._thread.start()
        self._queue.put(body)

    def flush(self, timeout_s: float = 2 * TIMEOUT_S) -> None:
        """Wait up to ``timeout_s`` for the queued alerts to be delivered (or to fail)."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self, timeout_s: float = 2 * TIMEOUT_S) -> None:
        """Deliver what is queued (bounded by ``timeout_s``) and stop the thread."""
        self.flush(timeout_s)
        if self._thread is not None:
            self._queue.put(None)

    def _deliver(self) -> None:
        while True:
            body = self._queue.get()
            try:
                if body is None:
                    return
                for url in self.webhooks:
                    self._post(url, body)
            finally:
                self._queue.task_done()

    def _post(self, url: str, body: bytes) -> None:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                response.read()
        except Exception as exc:  # any failure: warned once, training goes on
            if not self._warned:
                self._warned = True
                print(
                    f"warning: monitor.alert: the webhook {url} failed ({type(exc).__name__}: {exc}); training goes "
                    f"on, alerts are still tried and failures no longer reported",
                    file=sys.stderr,
                    flush=True,
                )


__all__ = ["Alerts", "alert_body", "TIMEOUT_S"]
