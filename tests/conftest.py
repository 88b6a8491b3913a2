"""pytest's setup for the tests: import paths and assertion rewriting. Shared helpers live in helpers.py."""

import os
import sys

import pytest

# tools/ (training recipes) is not installed with the package; its tests import it from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# helpers.py asserts on behalf of the tests (_close, raise_inside_block_1_mlp): rewritten like a test
# module's asserts, a failure there shows the compared values. Registered before any test module imports it.
pytest.register_assert_rewrite("helpers")
