import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HEAVY_SIZE = 128


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: builds the real KerasCV architecture (random weights)")


@pytest.fixture(scope="session")
def sd_model():
    """The real SD 1.4 architecture with seeded random weights at 128x128, built once."""
    from sdanim.models import load_model

    return load_model(weights="random", height=HEAVY_SIZE, width=HEAVY_SIZE, precision="float32", jit_compile=False)


@pytest.fixture
def tiny():
    from tiny import make_tiny_model

    return make_tiny_model()
