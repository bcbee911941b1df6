import os
import sys

_here = os.path.dirname(__file__)
for p in (os.path.join(_here, "..", "..", "firmware"), _here):
    p = os.path.abspath(p)
    if p not in sys.path:
        sys.path.insert(0, p)
