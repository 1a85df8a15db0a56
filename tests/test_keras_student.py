"""A Keras student of your own (``iepkt_tf.keras_model.KerasStudent``): a small functional CNN
with named sensing layers, and a subclassed model returning ``(logits, [maps])``, trained with IEP
and AT through ``DistillationModel.fit`` for a few steps (finite losses, the student and the
method's adapters/connectors move, the teacher does not)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from iepkt_tf.keras_model import DistillationModel, KerasStudent
from nets.nets_factory import get_network

SIZE, CLASSES, BATCH = 16, 4, 8
POINTS = ["p0", "p1", "p2", "p3"]
PRE = ["pre0", "pre1", "pre2", "pre3"]


def functional_cnn():
    """Sensing maps of the teacher's sizes on 16x16 (8x8, 8x8, 4x4, 2x2), other widths."""
    x = inputs = keras.Input((SIZE, SIZE, 3))
    for k, (width, stride) in enumerate([(8, 2), (12, 1), (24, 2), (40, 2)]):
        x = keras.layers.Conv2D(width, 3, stride, padding="same", use_bias=False, name=f"conv{k}")(x)
        x = keras.layers.BatchNormalization(name=PRE[k])(x)
        x = keras.layers.ReLU(name=POINTS[k])(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="logits")(x), name="cnn")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.convs = [keras.layers.Conv2D(w, 3, s, padding="same", activation="relu")
                      for w, s in [(8, 2), (12, 1), (24, 2), (40, 2)]]
        self.head = keras.layers.Dense(CLASSES)

    def call(self, x, training=False):
        maps = []
        for conv in self.convs:
            x = conv(x)
            maps.append(x)
        return self.head(tf.reduce_mean(x, [1, 2])), maps


def dataset(n=4):
    images = tf.random.stateless_uniform([n * BATCH, SIZE, SIZE, 3], seed=[4, 2])
    labels = tf.constant(list(range(CLASSES)) * (n * BATCH // CLASSES), tf.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH, drop_remainder=True)


def values(variables):
    return [np.array(v.numpy()) for v in variables]


@pytest.mark.parametrize("method, student_kind", [("IEP", "functional"), ("AT", "functional"),
                                                   ("IEP", "subclassed")])
def test_a_keras_student_trains_through_fit(method, student_kind):
    tf.random.set_seed(0)
    teacher = get_network("WResNet-10-2", CLASSES, "Teacher", SIZE, is_main=False)
    if student_kind == "functional":
        student = KerasStudent(functional_cnn(), POINTS, pre_relu_layers=PRE)
    else:
        student = KerasStudent(Subclassed(), image_size=(SIZE, SIZE))
    assert student.feature_channels == [8, 12, 24, 40] and student.num_classes == CLASSES
    assert student.feature_shapes((SIZE, SIZE))[1:] == [(8, 8, 12), (4, 4, 24), (2, 2, 40)]
    names = student.tf1_variables()
    assert any(n.endswith("/weights") for n in names)  # kernels decayed as the project's
    options = {"init_epoch": 1} if method == "IEP" else {}
    model = DistillationModel(student, teacher, method, seed=1, learning_rate=0.01, **options)
    s0 = values(student.model.trainable_variables)
    m0 = values(model.method.main_variables())
    t0 = values(teacher.variables)
    history = model.fit(dataset(), epochs=2 if method == "IEP" else 1, verbose=0)
    for k, series in history.history.items():
        assert np.all(np.isfinite(series)), (k, series)
    assert "cross_entropy" in history.history
    terms = {"IEP": ("k_int", "k_alt", "k_bb"), "AT": ("at1", "at2", "at3")}[method]
    assert any(k in history.history for k in terms), sorted(history.history)
    s1 = values(student.model.trainable_variables)
    assert all(not np.array_equal(a, b) for a, b in zip(s0, s1))
    m1 = values(model.method.main_variables())
    assert m0 and any(not np.array_equal(a, b) for a, b in zip(m0, m1))  # adapters / connectors
    for a, b in zip(t0, values(teacher.variables)):
        np.testing.assert_array_equal(a, b)
    probs = model.predict(dataset(1), verbose=0)
    assert probs.shape == (BATCH, CLASSES)


def test_a_method_that_needs_pre_relu_maps_says_so():
    tf.random.set_seed(0)
    teacher = get_network("WResNet-10-2", CLASSES, "Teacher", SIZE, is_main=False)
    student = KerasStudent(functional_cnn(), POINTS)  # no pre_relu_layers
    model = DistillationModel(student, teacher, "CO")
    with pytest.raises(ValueError, match="pre_relu_layers"):
        model.fit(dataset(1), epochs=1, verbose=0)
