"""Helpers the tests import (tiny models, reference-weight copies, the resumable training job). Fixtures live
in tests/conftest.py, which nothing imports."""
