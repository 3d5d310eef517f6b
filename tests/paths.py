"""Where the shared recordings live: `../shared` beside the repository (as in CI), or
CRYPTOFLOW_SHARED when set."""

import os
from pathlib import Path

SHARED = Path(os.environ.get("CRYPTOFLOW_SHARED") or Path(__file__).resolve().parents[2] / "shared")
RECORDED = SHARED / "data" / "recorded"
