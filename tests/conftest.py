import os
import tempfile

import pytest

# Keep test runs light on the 2-core machines; numerics do not depend on thread count.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Exported models (reid.engine) go to a cache of this run, never to the user's ~/.cache/reid.
os.environ["REID_CACHE_DIR"] = tempfile.mkdtemp(prefix="reid-test-cache-")


def pytest_configure(config):
    import torch

    torch.set_flush_denormal(True)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing entirely: gpu tests cannot run either
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    on_cpu = os.environ.get("REID_TEST_DEVICE") == "cpu"  # run the gpu checks' code on the CPU (tests/test_gpu.py)
    for item in items:
        if "gpu" in item.keywords and not has_cuda and not (on_cpu and item.module.__name__.endswith("test_gpu")):
            item.add_marker(skip_gpu)


# --- Milvus: one real server per session (tests/milvus_server.py), started on first use -------------------------


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """The session's Milvus standalone server (loopback, free ports); skips when the milvus package is missing."""
    import milvus_server as ms

    reason = ms.available()
    if reason:
        pytest.skip(reason)
    return ms.shared(tmp_path_factory.mktemp("milvus-server"))


def pytest_sessionfinish(session, exitstatus):
    import sys

    ms = sys.modules.get("milvus_server")
    if ms is not None:
        ms.stop_shared()
