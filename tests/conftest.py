"""pytest configuration. Shared helpers live in helpers.py (``from helpers import ...``);
the names below stay importable from conftest for modules not yet moved over."""
from helpers import make_qkv, rel_err, rotary_tables  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds on "
                                       "2 cores (deselect with -m 'not slow')")
