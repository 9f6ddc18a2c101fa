import os

import pytest

# Keep test runs light on the 2-core machines; numerics do not depend on thread count.
os.environ.setdefault("OMP_NUM_THREADS", "2")


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
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
