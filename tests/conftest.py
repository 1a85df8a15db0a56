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


def assert_close(got, ref, tol, what="", atol=0.0):
    """``max|got - ref| <= tol * max|ref| + atol`` in float64 (the fixtures README's per-array rule)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err = float(np.max(np.abs(got - ref))) if got.size else 0.0
    bound = tol * float(np.max(np.abs(ref))) + atol if ref.size else atol
    assert err <= bound, f"{what}: max|diff| {err:.3g} > {bound:.3g}"


def make_nets(seed=None):
    """A WRN-10-1 student and a WRN-10-2 teacher (unequal widths), 5 classes, 16x16 images;
    initialised after ``tf.random.set_seed(seed)`` when a seed is given."""
    import tensorflow as tf

    from nets.nets_factory import get_network

    if seed is not None:
        tf.random.set_seed(seed)
    student = get_network("WResNet-10-1", 5, "Student", (16, 16), is_main=True)
    teacher = get_network("WResNet-10-2", 5, "Teacher", (16, 16), is_main=False)
    return student, teacher


@pytest.fixture
def nets():
    """:func:`make_nets` under the per-test seed."""
    return make_nets()


def random_images(seed, batch=8, size=16):
    """A seeded batch of standard-normal images ``[batch, size, size, 3]``."""
    import tensorflow as tf

    return tf.random.stateless_normal([batch, size, size, 3], seed=list(seed))


def trainable(named):
    """The trainable entries of a ``{name: variable}`` dict."""
    return {n: v for n, v in named.items() if v.trainable}


def nonzero(grads):
    """Names whose gradient in ``{name: gradient}`` is present and not all zero."""
    import tensorflow as tf

    return {n for n, g in grads.items() if g is not None and float(tf.reduce_max(tf.abs(g))) > 0}
