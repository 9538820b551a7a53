import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# This tree's pycomm first (ROOT), then the shared helpers (dist_util, *_cases).
for path in (os.path.dirname(os.path.dirname(HERE)), HERE):
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)


def pytest_configure(config):
    # Failure tests make every rank write a flight-recorder dump; keep them out of /tmp.
    if "TORCH_FR_DUMP_TEMP_FILE" not in os.environ:
        dump_dir = tempfile.mkdtemp(prefix="pycomm-fr-")
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = os.path.join(dump_dir, "rank_")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and pycomm built with CUDA (skipped otherwise)")
