"""A probe target for tests/core/test_probes.py: records the modules its process holds, then beats.

It imports nothing itself, so what it records is what the probe runner loaded.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def record(ctx: Any) -> None:
    out = Path(ctx.config["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(sys.modules)))
    tmp.replace(out)
    while not ctx.should_stop():
        ctx.heartbeat()
        time.sleep(0.05)
