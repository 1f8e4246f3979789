"""How the test suite builds engines: eagerly (the default, as on CPU in production) or compiled.

`make test-compiled` (MMSERVE_TEST_COMPILED=1) runs the engine and family exactness suites with the language model
compiled (common/compilation.py), the same assertions against Hugging Face; tests/engine/test_compiled_exactness.py
runs compiled in every mode.
"""

from __future__ import annotations

import os

COMPILED = os.environ.get("MMSERVE_TEST_COMPILED") == "1"
ENFORCE_EAGER = not COMPILED  # an explicit value either way: tests do not depend on the device default
