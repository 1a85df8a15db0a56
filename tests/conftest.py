"""Shared test set-up: quiet TF, fixed seeds, and the fixture directory (tests/fixtures)."""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    import keras
    import tensorflow as tf
    np.random.seed(0)
    tf.random.set_seed(0)
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def fixtures_dir():
    return FIXTURES


def load_fixture(name):
    """np.load a fixture file from tests/fixtures (keys contain '/')."""
    return np.load(FIXTURES / name, allow_pickle=False)
