"""`python -m tf_dpsat.accounting`: the privacy statement command line tool.

A package `__main__` (rather than running `accounting.py` as `__main__`) so that
the module the package imports is not executed a second time, which made Python
warn on every call (runpy's RuntimeWarning).
"""

import sys

from tf_dpsat.accounting import main

if __name__ == "__main__":
    sys.exit(main())
