from __future__ import annotations

import sys
from pathlib import Path

# Helpers beside the tests (crd_tools) import as top-level modules whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))
