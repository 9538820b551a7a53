import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# This tree's pycomm first (ROOT), then the shared helpers (dist_util, *_cases).
for path in (os.path.dirname(os.path.dirname(HERE)), HERE):
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and pycomm built with CUDA (skipped otherwise)")
