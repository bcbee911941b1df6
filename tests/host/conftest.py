import os
import sys

# --import-mode=importlib does not put test folders on sys.path; host tests share helpers by module name.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)
