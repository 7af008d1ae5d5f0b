"""The one logging helper: console + human log file, and one JSON line per record for plots.

Every record that goes to visdom also goes to the JSONL file, so a dashboard can be rebuilt and
plots drawn (``python -m utils.plot``) without a server. A run's first record is preceded by a
``run`` record saying whether the run is resumed: logs append, and that is how the plots tell
where the last run from scratch begins (``run_start``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class Sink:
    """Where RunLogger's records go besides the JSONL file; this one plots nothing.

    ``resumed`` tells whether the run continues a checkpoint (None: unknown, no ``run`` record).
    It travels with the sink because the sink is built from the run's flags (``make_sink``).
    """

    def __init__(self, resumed: bool | None = None) -> None:
        self.resumed = resumed

    def record(self, row: dict[str, Any]) -> None:
        """Take one record (RunLogger has written it to the JSONL file already)."""

    def close(self) -> None:
        """Finish at the end of the run."""


def run_start(row: dict[str, Any]) -> bool | None:
    """Whether ``row`` begins a run from scratch (True) or a resumed one (False); None for other rows.

    The one rule for both the live dashboard and the offline plots.
    """
    return not row["resumed"] if row["kind"] == "run" else None


class RunLogger:
    """Writes ``text`` to stdout and ``log_path``, records to ``log_path.with_suffix('.jsonl')``.

    ``enabled=False`` (non-zero ranks) makes every call a no-op.
    """

    def __init__(self, log_path: Path | None, enabled: bool = True, sink: Sink | None = None) -> None:
        self.enabled, self.sink = enabled, sink
        self.text = self.jsonl = None
        # Written with the first record, so a run that fails before recording anything leaves no
        # start behind to hide the run before it.
        self._start = None if sink is None else sink.resumed
        if enabled and log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.text = open(log_path, "a", buffering=1)
            self.jsonl = open(log_path.with_suffix(".jsonl"), "a", buffering=1)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, flush=True)
        if self.text:
            self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def record(self, kind: str, **values: Any) -> None:
        """One JSON line ``{"kind": kind, "time": ..., **values}``; also sent to the plotting sink."""
        if not self.enabled:
            return
        if self._start is not None:
            resumed, self._start = self._start, None
            self._write({"kind": "run", "time": round(time.time(), 3), "resumed": resumed})
        self._write({"kind": kind, "time": round(time.time(), 3), **values})

    def _write(self, row: dict[str, Any]) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())
        if self.sink is not None:
            self.sink.record(row)

    def close(self) -> None:
        for f in (self.text, self.jsonl):
            if f:
                f.close()
        if self.sink is not None:
            self.sink.close()


def progress(iterable, **kwargs: Any):
    """A tqdm bar when stderr is a terminal, the bare iterable otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)
