from __future__ import annotations

import os

QUICK = os.environ.get("SHMNONCE_BENCH_QUICK") == "1"
