"""The property-based suite over the public API (see ``_hyp.py``).

pytest runs with ``--import-mode=importlib``, which does not put a test's directory on the path:
put this one there so that the test modules share ``_hyp``.
"""

import pathlib
import sys

_HERE = str(pathlib.Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
