"""Make the repository's packages importable when a launch script runs from any folder.

`python launch/x.py` and `accelerate launch launch/x.py` put `launch/` on sys.path, not the
working directory; an editable install covers it too, but a plain checkout should also work.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
