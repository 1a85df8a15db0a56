"""A Keras-native face of the project: ``DistillationModel(student, teacher, method).fit(dataset)``.

Keras' own ``keras.distillation.Distiller`` overrides ``compute_loss``, which cannot carry the
project's methods (initial phases, per-loss gradient clipping against the cross-entropy gradient
for MHGD/IEP, IEP's incremental-PCA state, the authors' TF1 Nesterov momentum). This
``keras.Model`` instead runs the project's own compiled steps (:mod:`op_util.train_steps`), so
``fit()`` trains exactly as ``train_w_distill.py`` / ``trainer.run`` does:

* ``train_step`` calls :func:`~op_util.train_steps.make_init_step` during the method's initial
  phase (the first ``init_epoch`` epochs) and :func:`~op_util.train_steps.make_main_step` after,
  with the learning rate and warm-up of the current epoch (``op_util.schedules``, as ``trainer``
  computes them, the method's ``init_learning_rate`` included) and the per-step seed
  ``[seed, global_step]`` (``global_step = epoch * steps_per_epoch + batch``, the trainer's);
* :class:`DistillationSchedule` (added by ``fit`` unless given) sets the epoch, phase, rate and
  warm-up at each epoch's start and, when the initial phase trained the student (AB), zeroes the
  student's momentum when the main phase starts (the trainer's ``_reset_student_momentum``);
* the optimiser is the project's :class:`~op_util.optimizer.NesterovMomentum` (``model.nesterov``;
  Keras' ``model.optimizer`` stays None); ``test_step`` is :func:`make_eval_step` (top-1 accuracy
  and mean cross-entropy over the images seen);
* the steps are already ``tf.function``\\ s, so the model compiles itself with
  ``run_eagerly=True, jit_compile=False``: Keras' loop is plain Python around the same compiled
  steps the trainer calls (``compile(run_eagerly=False)`` traces ``train_step`` into an outer
  ``tf.function`` as well; the phase switch then retraces it);
* ``save_weights``/``load_weights`` (and so ``keras.callbacks.BackupAndRestore``) hold the whole
  training state by name: the student (BN statistics included), the method's state
  (``state_variables``: connectors, IEP's module and incremental-PCA state), the optimiser's
  slots and step counter, and the global step.

Data: any ``tf.data.Dataset`` of ``(images, labels)`` batches. :func:`trainer_dataset` gives the
trainer's own batches (a fresh seeded permutation and augmentation per epoch, from the epoch the
model is at, so a run resumed by BackupAndRestore sees the batches an uninterrupted one does).

A student of your own: :class:`KerasStudent` wraps any Keras model whose sensing points you name
(a functional model plus layer names, or a subclassed model returning ``(logits, [maps])``) into
the network interface the methods read (``feature_channels``, ``feature_shapes``, ``num_classes``,
``tf1_variables``); adapters/connectors where widths differ come from the methods as for the
project's networks.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from iepkt_tf.distillers import METHODS, build
from op_util.optimizer import _Untracked  # a plain holder, invisible to Keras' tracking
from op_util.schedules import learning_rate as schedule_rate
from op_util.schedules import warmup as schedule_warmup

NOT_LOSSES = ("accuracy", "applied", "warmup")



# --------------------------------------------------------------------------------- the student
@keras.saving.register_keras_serializable(package="iepkt_tf")
class KerasStudent(keras.Model):
    """Any Keras classifier as a sensing network for the methods: ``call(images, training) ->
    (logits, feats)`` (``(logits, feats, pre_feats)`` with ``pre_relu=True``).

    ``model``: a functional Keras model (then ``layers`` names its sensing layers, whose outputs
    become the maps; ``pre_relu_layers`` optionally the layers whose outputs are the same points
    before their ReLU, which AB, CO and AT's ``tf2`` form read), or any model whose call returns
    ``(logits, [maps])`` (``layers`` None). The methods read 4 sensing points, ``feats[1:4]``
    (FT ``feats[3]``); with 3 names the model's input stands in for the unused point 0.
    Variables are named ``<scope>/<keras path>`` with the leaf ``weights`` for kernels and
    ``biases`` for biases, so the project's weight decay (conv/dense kernels, BN gamma/beta)
    applies to them as to its own networks.
    """

    def __init__(self, model, layers=None, pre_relu_layers=None, image_size=None, scope="Student",
                 num_classes=None, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{scope}_keras"), **kwargs)
        self.scope = scope
        self.layer_names = list(layers) if layers is not None else None
        self.pre_relu_names = list(pre_relu_layers) if pre_relu_layers is not None else None
        if self.layer_names is not None:
            if len(self.layer_names) not in (3, 4):
                raise ValueError(f"KerasStudent: name 3 or 4 sensing layers, got {self.layer_names}")
            if self.pre_relu_names is not None and len(self.pre_relu_names) != len(self.layer_names):
                raise ValueError("KerasStudent: pre_relu_layers must name as many layers as layers")
            outs = [model.get_layer(n).output for n in self.layer_names]
            pres = [model.get_layer(n).output for n in (self.pre_relu_names or [])]
            if len(outs) == 3:
                outs = [model.inputs[0]] + outs
                pres = ([model.inputs[0]] + pres) if pres else pres
            self.sensing = keras.Model(model.inputs, [model.outputs[0], outs, pres],
                                       name=f"{model.name}_sensing")
        else:
            if pre_relu_layers is not None:
                raise ValueError("KerasStudent: pre_relu_layers needs a functional model and layers")
            self.sensing = model
        self.model = model
        if image_size is None:
            shape = model.inputs[0].shape if getattr(model, "inputs", None) else None
            if shape is None or shape[1] is None:
                raise ValueError("KerasStudent: give image_size (the model has no static input shape)")
            image_size = (int(shape[1]), int(shape[2]))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        logits, feats, _ = self._run(tf.zeros([1, *self.image_size, 3]), False, want_pre=False)
        self.num_classes = int(num_classes or logits.shape[-1])
        self.feature_channels = [int(f.shape[-1]) for f in feats]
        self._shapes = [tuple(int(d) for d in f.shape[1:]) for f in feats]
        self.keep_rate = 1.0  # dropout, if any, is the model's own (Keras' RNG)
        self.dropout_scopes = []
        self.arch = f"keras:{model.name}"
        self.built = True

    def _run(self, images, training, want_pre):
        out = self.sensing(images, training=training)
        if self.layer_names is not None:
            logits, feats, pres = out
        else:
            logits, feats = out[0], out[1]
            pres = []
        feats = list(feats)
        if want_pre and not pres:
            raise ValueError("KerasStudent: this method reads the maps before their ReLU; name "
                             "them with pre_relu_layers (or choose a method or form that does not)")
        return tf.cast(logits, tf.float32), feats, list(pres)

    def call(self, images, training=False, pre_relu=False, dropout_masks=None):
        del dropout_masks
        logits, feats, pres = self._run(images, training, want_pre=pre_relu)
        return (logits, feats, pres) if pre_relu else (logits, feats)

    def feature_shapes(self, image_size):
        if tuple(int(d) for d in tuple(image_size)[:2]) != self.image_size:
            raise ValueError(f"KerasStudent was built for {self.image_size} images, got {image_size}")
        return [tuple(s) for s in self._shapes]

    def tf1_variables(self):
        """``{scope/<keras path with kernel -> weights, bias -> biases>: variable}``."""
        out = {}
        for v in self.model.variables:
            parts = v.path.split("/")
            leaf = {"kernel": "weights", "bias": "biases"}.get(parts[-1], parts[-1])
            out["/".join([self.scope] + parts[:-1] + [leaf])] = v
        return out

    def get_config(self):
        return {"model": keras.saving.serialize_keras_object(self.model), "layers": self.layer_names,
                "pre_relu_layers": self.pre_relu_names, "image_size": list(self.image_size),
                "scope": self.scope, "num_classes": self.num_classes, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


# --------------------------------------------------------------------------------- the data
def trainer_dataset(images, labels, batch_size, seed, model):
    """The trainer's training batches as one ``tf.data.Dataset`` for ``model.fit``: each pass
    yields ``dataloader.pipeline.train_dataset(images, labels, batch_size, seed, epoch)`` for the
    epoch ``model`` is at when the pass starts (a fresh seeded permutation and augmentation per
    epoch, incomplete last batch dropped), so a resumed ``fit`` sees the batches of an
    uninterrupted one. ``images`` uint8 ``[N, H, W, 3]``, ``labels`` ``[N]``."""
    from dataloader.pipeline import steps_per_epoch, train_dataset

    images = tf.convert_to_tensor(images)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    spe = steps_per_epoch(int(images.shape[0]), batch_size)

    def epoch_batches():
        for x, y in train_dataset(images, labels, batch_size, seed, int(model.epoch)):
            yield x.numpy(), y.numpy()

    h, w, c = (int(d) for d in images.shape[1:])
    ds = tf.data.Dataset.from_generator(epoch_batches, output_signature=(
        tf.TensorSpec([batch_size, h, w, c], tf.float32), tf.TensorSpec([batch_size], tf.int32)))
    return ds.apply(tf.data.experimental.assert_cardinality(spe))


# --------------------------------------------------------------------------------- the schedule
class DistillationSchedule(keras.callbacks.Callback):
    """Sets the epoch, phase, learning rate and warm-up of a :class:`DistillationModel` at every
    epoch's start, as ``trainer`` does: ``lr = learning_rate(epoch, init_epoch, train_epoch,
    base)`` (the method's ``init_learning_rate`` during its initial phase, if set), ``warm =
    warmup(epoch, init_epoch)``, ``train_epoch = epochs - init_epoch`` unless the model fixes it;
    zeroes the student's momentum when the main phase starts after an initial phase that trained
    the student (AB); keeps ``global_step = epoch * steps_per_epoch``. ``fit`` adds one."""

    def on_train_begin(self, logs=None):
        epochs = self.params.get("epochs")
        self.model._begin_training(epochs)

    def on_epoch_begin(self, epoch, logs=None):
        self.model._begin_epoch(int(epoch), self.params.get("steps"))


# --------------------------------------------------------------------------------- the model
@keras.saving.register_keras_serializable(package="iepkt_tf")
class DistillationModel(keras.Model):
    """``method`` (a key of ``METHODS``) training ``student`` with ``teacher`` through ``fit``.

    ``student``/``teacher``: the project's networks (``nets.nets_factory.get_network``, the
    teacher's parameters loaded, e.g. ``trainer.load_teacher``) or :class:`KerasStudent`;
    ``teacher`` None for ``"None"``. ``**options``: the method's own flags (``at_beta=...``,
    ``mpnn_iter=...``) and ``init_epoch`` (default the method's), validated as ``build`` and the
    config do. ``weight_decay``, ``momentum``, ``seed``, ``learning_rate`` (base rate),
    ``decay_points``/``decay_rate`` and ``train_epoch`` (default: ``fit``'s ``epochs`` minus
    ``init_epoch``) are the trainer's settings. ``call(images)`` gives the student's logits.
    """

    def __init__(self, student, teacher=None, method="IEP", *, weight_decay=5e-4, momentum=0.9,
                 seed=0, learning_rate=0.1, decay_points=(0.3, 0.6, 0.8), decay_rate=0.2,
                 train_epoch=None, image_size=None, name="distillation", **options):
        super().__init__(name=name)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        cls = METHODS[method]
        if cls.needs_teacher and teacher is None:
            raise ValueError(f"method {method} needs a teacher")
        self._check_options(cls, options)
        if image_size is None:
            image_size = getattr(student, "image_size", None) or (int(student.input_height),) * 2
        image_size = (int(image_size[0]), int(image_size[1]))
        from op_util.optimizer import NesterovMomentum
        from op_util.train_steps import make_eval_step, optimizer_variables

        self.method_name = method
        self.options = dict(options)
        self.weight_decay, self.momentum, self.seed = float(weight_decay), float(momentum), int(seed)
        self.base_learning_rate = float(learning_rate)
        self.decay_points, self.decay_rate = tuple(float(d) for d in decay_points), float(decay_rate)
        self.fixed_train_epoch = None if train_epoch is None else int(train_epoch)
        self.image_size = image_size
        self.student = student
        self.teacher = teacher if cls.needs_teacher else None
        method_obj = build(method, student, self.teacher, image_size=image_size, **options)
        self.init_epoch = int(method_obj.options["init_epoch"])
        if self.init_epoch and not cls.default_init_epoch:
            raise ValueError(f"init_epoch > 0: method {method} has no initial phase")
        nesterov = NesterovMomentum(optimizer_variables(student, method_obj), momentum=self.momentum)
        # Kept out of Keras' tracking: the weight files hold them by name (save_own_variables).
        self._state = _Untracked(
            method=method_obj, nesterov=nesterov, steps={}, eval_step=make_eval_step(student),
            lr=tf.Variable(self.base_learning_rate, dtype=tf.float32, trainable=False, name="lr"),
            warm=tf.Variable(0.0, dtype=tf.float32, trainable=False, name="warm"),
            global_step=tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step"),
            epoch=0, train_epoch=self.fixed_train_epoch, means={}, traced_phase=None)
        self._set_epoch_values(0)
        self.built = True
        super().compile(optimizer=None, run_eagerly=True, jit_compile=False)

    @staticmethod
    def _check_options(cls, options):
        known = {f.name: f for f in cls.flags}
        unknown = sorted(set(options) - set(known) - {"init_epoch"})
        if unknown:
            from iepkt_tf.config import FLAG_OWNERS

            for name in unknown:
                if name in FLAG_OWNERS:
                    raise ValueError(f"{name} is a flag of {'/'.join(FLAG_OWNERS[name])}, not of {cls.name}")
            raise ValueError(f"{cls.name}: unknown option(s) {unknown}; known: {sorted(known) + ['init_epoch']}")
        for name, value in options.items():
            f = known.get(name)
            if f is None:
                continue
            if f.kind == "enum" and value not in f.enum:
                raise ValueError(f"{name} must be one of {f.enum}, got {value!r}")
            problem = f.check(value) if f.check is not None else None
            if problem:
                raise ValueError(f"{name} {problem}, got {value!r}")
        values = {f.name: options.get(f.name, f.default) for f in cls.flags}
        problem = cls.check_options(values)
        if problem:
            raise ValueError(problem)
        init = options.get("init_epoch")
        if init is not None and (not isinstance(init, int) or isinstance(init, bool) or init < 0):
            raise ValueError(f"init_epoch must be an integer >= 0, got {init!r}")

    # ---- what the method and optimiser are
    @property
    def method(self):
        """The method object (``iepkt_tf.distillers``)."""
        return self._state.method

    @property
    def nesterov(self):
        """The optimiser: ``op_util.optimizer.NesterovMomentum`` over the student and the method."""
        return self._state.nesterov

    @property
    def epoch(self):
        """The epoch being trained (0-based, the initial phase first)."""
        return self._state.epoch

    @property
    def phase(self):
        return "init" if self._state.epoch < self.init_epoch else "main"

    @property
    def global_step(self):
        return self._state.global_step

    @property
    def learning_rate(self):
        return float(self._state.lr.numpy())

    @property
    def warm(self):
        return float(self._state.warm.numpy())

    # ---- compiling
    def compile(self, optimizer=None, loss=None, metrics=None, run_eagerly=True, jit_compile=False,
                steps_per_execution=1, **kwargs):
        """Only the loop settings: the optimiser, losses and metrics are the method's.
        ``run_eagerly=True`` (default) calls the project's compiled steps from Keras' Python loop,
        as the trainer does; False traces ``train_step`` into an outer ``tf.function`` as well."""
        if optimizer is not None or loss is not None or metrics is not None or kwargs:
            raise ValueError("DistillationModel.compile: the optimiser (NesterovMomentum), losses "
                             "and metrics are the method's; pass only run_eagerly, jit_compile, "
                             "steps_per_execution")
        super().compile(optimizer=None, run_eagerly=run_eagerly, jit_compile=jit_compile,
                        steps_per_execution=steps_per_execution)
        self._state.traced_phase = None

    def _step(self, phase):
        """The compiled step of ``phase`` (built on first use, once)."""
        steps = self._state.steps
        if phase not in steps:
            from op_util.train_steps import make_init_step, make_main_step

            m, s = self._state.method, self._state
            if phase == "init":
                steps[phase] = make_init_step(m, self.student, self.teacher, s.nesterov,
                                              self.weight_decay, jit_compile=False)
            else:
                steps[phase] = make_main_step(m, self.student, self.teacher, s.nesterov,
                                              self.weight_decay, jit_compile=False)
        return steps[phase]

    # ---- the schedule (DistillationSchedule calls these)
    def _begin_training(self, epochs):
        if self.fixed_train_epoch is None and epochs is not None:
            self._state.train_epoch = max(0, int(epochs) - self.init_epoch)

    def _set_epoch_values(self, epoch):
        s = self._state
        s.epoch = int(epoch)
        train_epoch = s.train_epoch if s.train_epoch is not None else 0
        lr = schedule_rate(epoch, self.init_epoch, train_epoch, base=self.base_learning_rate,
                           decay_points=self.decay_points, decay_rate=self.decay_rate)
        if epoch < self.init_epoch and s.method.init_learning_rate is not None:
            lr = float(s.method.init_learning_rate)
        s.lr.assign(lr)
        s.warm.assign(schedule_warmup(epoch, self.init_epoch))

    def _begin_epoch(self, epoch, steps_per_epoch=None):
        s = self._state
        self._set_epoch_values(epoch)
        if steps_per_epoch:
            s.global_step.assign(int(epoch) * int(steps_per_epoch))
        if epoch == self.init_epoch > 0 and s.method.init_trains_student:
            for v in self.student.tf1_variables().values():
                if v.trainable:
                    slot = s.nesterov.slot(v)
                    slot.assign(tf.zeros_like(slot))
        if not self.run_eagerly and s.traced_phase not in (None, self.phase):
            self.make_train_function(force=True)  # the outer tf.function baked the other phase
        s.traced_phase = self.phase

    # ---- Keras' loop
    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            **kwargs):
        """``keras.Model.fit`` with a :class:`DistillationSchedule` first among the callbacks
        (unless one is given) and ``shuffle=False`` by default (Keras never shuffles a Dataset)."""
        callbacks = list(callbacks or [])
        if not any(isinstance(c, DistillationSchedule) for c in callbacks):
            callbacks.insert(0, DistillationSchedule())
        kwargs.setdefault("shuffle", False)
        return super().fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                           callbacks=callbacks, **kwargs)

    def call(self, images, training=False):
        return self.student(images, training=training)[0]

    @property
    def metrics(self):
        return []

    def reset_metrics(self):
        self._state.means = {}

    def _running_means(self, values, weight=1.0):
        """Keras' Mean-metric semantics over the epoch, kept outside Keras' weight files."""
        means = self._state.means
        for k, v in values.items():
            total, count = means.get(k, (0.0, 0.0))
            means[k] = (total + float(v) * weight, count + weight)
        return {k: t / c for k, (t, c) in means.items()}

    def train_step(self, data):
        images, labels = data[0], data[1]
        s = self._state
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.convert_to_tensor(s.global_step)])
        if self.phase == "init":
            out = self._step("init")(images, labels, tf.convert_to_tensor(s.lr), seed)
        else:
            out = self._step("main")(images, labels, tf.convert_to_tensor(s.lr),
                                     tf.convert_to_tensor(s.warm), seed)
        s.global_step.assign_add(1)
        out = {k: tf.cast(v, tf.float32) for k, v in out.items() if k != "applied"}
        if not tf.executing_eagerly():  # inside compile(run_eagerly=False)'s tf.function
            return out
        return self._running_means(out)

    def test_step(self, data):
        images, labels = data[0], data[1]
        correct, ce_sum = self._state.eval_step(images, labels)
        if not tf.executing_eagerly():  # per-batch values (compile(run_eagerly=False))
            n = tf.cast(tf.shape(labels)[0], tf.float32)
            return {"accuracy": correct / n, "loss": ce_sum / n}
        n = int(labels.shape[0])
        return self._running_means({"accuracy": float(correct) / n, "loss": float(ce_sum) / n},
                                   weight=n)

    # ---- state by name (save_weights, BackupAndRestore)
    def state_variables(self):
        """``{name: variable}`` of everything training changes: the student, the method's state,
        the optimiser (slots and step counter), the global step."""
        s = self._state
        named = {"student/" + n: v for n, v in self.student.tf1_variables().items()}
        named.update({"method/" + n: v for n, v in s.method.state_variables().items()})
        named.update({"optimizer/" + n: v for n, v in s.nesterov.slots.items()})
        named["optimizer/iterations"] = s.nesterov.iterations
        named["global_step"] = s.global_step
        return named

    def save_own_variables(self, store):
        for i, (_, v) in enumerate(sorted(self.state_variables().items())):
            store[str(i)] = np.asarray(v.numpy())

    def load_own_variables(self, store):
        named = sorted(self.state_variables().items())
        if len(store.keys()) != len(named):
            raise ValueError(f"{self.name}: the weight file holds {len(store.keys())} state arrays, "
                             f"this model {len(named)} (another method, network or flags?)")
        for i, (n, v) in enumerate(named):
            value = np.asarray(store[str(i)])
            if tuple(value.shape) != tuple(v.shape):
                raise ValueError(f"{self.name}: {n} has shape {tuple(v.shape)}, the file {value.shape}")
            v.assign(value)

    # ---- the student out
    def export_student(self, path, format=None, overwrite=False):
        """Write the trained student for inference. A project network (its ``call`` returns
        ``(logits, [maps])``, which ``keras.Model.export`` cannot serve: a SavedModel signature's
        outputs must be flat) goes through ``iepkt_tf.export``: a SavedModel (or ``.keras`` /
        ``.tflite`` by the extension or ``format``) taking images in 0..255, uint8 or float32,
        normalised inside, and returning ``{"logits", "probabilities"}``; a :class:`KerasStudent`
        is the wrapped Keras model's own ``export`` (its inputs as you feed them). Returns ``path``."""
        if isinstance(self.student, KerasStudent):
            self.student.model.export(path, format=format or "tf_saved_model", verbose=False)
            return path
        from iepkt_tf.export import build_classifier, export_model
        from iepkt_tf.mat_io import collect_params

        scope = self.student.scope
        arrays = collect_params(self.student.tf1_variables(), scope=scope)
        classifier = build_classifier(arrays, scope, arch=self.student.arch,
                                      num_classes=self.student.num_classes, image_size=self.image_size)
        export_model(classifier, path, format, overwrite=overwrite)
        return path

    # ---- config
    def get_config(self):
        return {"student": _net_config(self.student), "teacher": _net_config(self.teacher),
                "method": self.method_name, "weight_decay": self.weight_decay,
                "momentum": self.momentum, "seed": self.seed, "learning_rate": self.base_learning_rate,
                "decay_points": list(self.decay_points), "decay_rate": self.decay_rate,
                "train_epoch": self.fixed_train_epoch, "image_size": list(self.image_size),
                "name": self.name, **self.options}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        image_size = tuple(config["image_size"])
        student = _net_from_config(config.pop("student"), image_size)
        teacher = _net_from_config(config.pop("teacher"), image_size)
        return cls(student, teacher, config.pop("method"), **config)


def _net_config(net):
    if net is None:
        return None
    if isinstance(net, KerasStudent):
        return {"keras": keras.saving.serialize_keras_object(net)}
    return {"arch": net.arch, "num_classes": int(net.num_classes), "scope": net.scope,
            "keep_rate": float(getattr(net, "keep_rate", 1.0))}


def _net_from_config(config, image_size):
    """A network rebuilt from :func:`_net_config` (its parameters freshly initialised: load them
    with ``load_weights`` or, for a teacher, ``mat_io.assign_params``)."""
    if config is None:
        return None
    if "keras" in config:
        return keras.saving.deserialize_keras_object(config["keras"])
    from nets.nets_factory import get_network

    net = get_network(config["arch"], config["num_classes"], config["scope"], image_size,
                      is_main=config["scope"] == "Student")
    if getattr(net, "keep_rate", 1.0) != config.get("keep_rate", 1.0):
        raise ValueError(f"{config['arch']}: keep rate {net.keep_rate} != saved {config['keep_rate']}")
    return net
