from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # chart_tools
sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))  # e2e_tools: waiting for a job to get somewhere
sys.path.insert(0, str(Path(__file__).parents[1] / "chaos"))  # the chaos table: row 9 is checked here
