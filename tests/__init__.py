"""atlas's test suite: fixtures in ``conftest.py``, shared helpers in ``helpers.py``."""
