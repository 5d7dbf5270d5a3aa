from __future__ import annotations

import sys
from pathlib import Path

# The API tests' helpers (crd_tools: the committed CRD, CEL, minimal specs) serve these tests too.
sys.path.insert(0, str(Path(__file__).parents[1] / "api"))
