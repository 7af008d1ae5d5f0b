"""The one logging helper: console + human log file, and one JSON line per record for plots.

Every record that goes to visdom also goes to the JSONL file, so a dashboard can be rebuilt and
plots drawn (``python -m utils.plot``) without a server.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes ``text`` to stdout and ``log_path``, records to ``log_path.with_suffix('.jsonl')``.

    ``enabled=False`` (non-zero ranks) makes every call a no-op.
    """

    def __init__(self, log_path: Path | None, enabled: bool = True, sink: Any = None) -> None:
        self.enabled, self.sink = enabled, sink
        self.text = self.jsonl = None
        if enabled and log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.text = open(log_path, "a", buffering=1)
            self.jsonl = open(log_path.with_suffix(".jsonl"), "a", buffering=1)
            self.jsonl_path = log_path.with_suffix(".jsonl")

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
        row = {"kind": kind, "time": round(time.time(), 3), **values}
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
