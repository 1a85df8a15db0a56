r"""Export a trained network (a ``train_params.mat``) for inference: SavedModel, ``.keras`` or TFLite.

    python -m iepkt_tf.export --params runs/teacher/train_params.mat --arch WResNet-40-4 \
        --out exported/teacher [--format savedmodel|keras|tflite] [--quantize dynamic]

The network is built in inference mode (no dropout, batch norm with the moving statistics), loaded
strictly by TF1 name and wrapped in :class:`Classifier`: images ``[N, S, S, 3]``, uint8 or float32 in
the 0..255 range, go through the authors' normalisation (``dataloader.preprocessing.normalize``)
inside the model, and the output is ``{"logits", "probabilities"}`` (softmax), computed in float32.

* ``savedmodel`` (a directory): signatures ``serving_default`` (uint8 images) and ``serving_float``
  (float32 images); ``tf.saved_model.load(path).signatures["serving_default"](images=x)``.
* ``keras`` (``.keras`` file): ``keras.models.load_model(path)`` after ``import iepkt_tf.export``
  (which registers :class:`Classifier`); calling the model returns the same dict.
* ``tflite`` (``.tflite`` file): the uint8 signature, float32 weights, or dynamic-range int8
  weights with ``--quantize dynamic``.

``--format`` defaults to the ``--out`` extension (``.keras``, ``.tflite``, none for savedmodel;
another extension is refused unless ``--format savedmodel`` is given),
``--scope`` to the single network scope of the file, ``--num_classes`` to the size of
``<scope>/full/biases`` and ``--arch`` to the architecture read from the parameter names and shapes.
Every output is written to a temporary name beside ``--out`` and renamed, so ``--out`` is either
absent or complete; an existing ``--out`` is only replaced with ``--overwrite``, and only if it is
an export of that format (a run folder, or any directory that is not a SavedModel, is refused: the
parameters being exported may live there). Errors are one line
on stderr (``export: error: ...``) and exit status 2.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
if __name__ == "__main__":  # a quiet console: TensorFlow's C++ start-up lines only with --verbosity
    from iepkt_tf.quiet import import_tensorflow
    import_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from dataloader.preprocessing import normalize  # noqa: E402
from iepkt_tf.cli import tool_main  # noqa: E402
from iepkt_tf.mat_io import (MatFileError, ParamsMismatchError, assign_params,  # noqa: E402,F401
                              check_finite, load_mat, one_line, resolve_scope)
from nets.base import image_hw  # noqa: E402
from nets.nets_factory import arch_from_params, get_network  # noqa: E402

FORMATS = ("savedmodel", "keras", "tflite")
QUANTIZE = ("none", "dynamic")
ERRORS = (ValueError, OSError, RuntimeError, tf.errors.OpError, flags.Error)


@keras.saving.register_keras_serializable(package="iepkt_tf")
class Classifier(keras.Model):
    """``arch`` under ``scope`` in inference mode behind the authors' normalisation.

    ``call(images)``: ``[N, H, W, 3]`` uint8 or float (0..255) -> ``{"logits", "probabilities"}``
    float32. Always float32, whatever the global dtype policy. ``net`` is the wrapped network.
    """

    def __init__(self, arch, num_classes, scope="Student", image_size=32, precision="float32", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.arch, self.num_classes, self.scope = str(arch), int(num_classes), str(scope)
        self.image_size = image_hw(image_size)
        policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy(precision)  # the network's; the outputs stay float32
        try:
            self.net = get_network(self.arch, self.num_classes, self.scope, self.image_size, is_main=False)
        finally:
            keras.config.set_dtype_policy(policy)
        self(tf.zeros([1, *self.image_size, 3], tf.uint8))

    def call(self, images):
        logits, _ = self.net(normalize(images), training=False)
        logits = tf.cast(logits, tf.float32)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def get_config(self):
        return {"arch": self.arch, "num_classes": self.num_classes, "scope": self.scope,
                "image_size": list(self.image_size), "name": self.name}


# ---------------------------------------------------------------------------------------------
# Reading and checking a parameter file (shared with iepkt_tf.evaluate).

def classes_in(arrays, scope, what="--params"):
    """The number of classes: the size of ``<scope>/full/biases``."""
    bias = arrays.get(f"{scope}/full/biases")
    if bias is None or bias.size < 1:
        raise ValueError(f"{what}: no {scope}/full/biases in the file (cannot tell the number of classes)")
    return int(bias.size)


def read_params(path, scope=None, what="--params"):
    """``(arrays, scope)`` of a .mat, with the scope resolved and its parameters checked finite."""
    arrays = load_mat(path, what=what)
    scope = resolve_scope(arrays, scope, f"{what} {path}")
    check_finite(arrays, scope, f"{what} {path}")
    return arrays, scope


def build_classifier(arrays, scope, arch=None, num_classes=None, image_size=32, what="--params",
                     precision="float32"):
    """A :class:`Classifier` with ``arrays`` loaded strictly under ``scope``; ``arch`` and
    ``num_classes`` default to what the file says; ``precision`` is the network's dtype policy
    (an export is float32)."""
    if not arch:
        try:
            arch = arch_from_params(arrays, scope)
        except ValueError as e:
            raise ValueError(f"{what}: cannot infer the architecture ({e}); pass --arch") from None
    num_classes = num_classes or classes_in(arrays, scope, what)
    model = Classifier(arch, num_classes, scope, image_size, precision)
    assign_params(model.net.tf1_variables(), arrays, scope=scope, strict=True, what=f"{what} as {arch}")
    return model


# ---------------------------------------------------------------------------------------------
# Writers. Each writes to a temporary name in the directory of ``out`` and renames it.

def serving_function(model, dtype):
    """The model as a ``tf.function`` over ``[None, H, W, 3]`` images of ``dtype``."""
    spec = tf.TensorSpec([None, *model.image_size, 3], dtype, name="images")
    return tf.function(lambda images: model(images), input_signature=[spec])


def _permissions(path, mode):
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _replace(tmp, out):
    """Rename ``tmp`` to ``out``; an existing ``out`` (file or directory) is moved aside first."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = tmp + ".old"
    os.rename(out, old)
    os.rename(tmp, out)
    _remove(old)


def write_atomically(out, write, directory=False):
    """``write(tmp)`` fills a temporary file (or directory) beside ``out``, renamed to ``out``
    when it returns; on error it is removed and ``out`` is untouched."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    base = "." + os.path.basename(os.path.abspath(out)) + "."
    if directory:
        tmp = tempfile.mkdtemp(dir=parent, prefix=base, suffix=".tmp")
    else:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=base, suffix=".tmp" + os.path.splitext(out)[1])
        os.close(fd)
    try:
        write(tmp)
        _permissions(tmp, 0o777 if directory else 0o666)
        _replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def serving_module(model):
    """A tf.Module with the model's serving functions (``serve_uint8``, ``serve_float``) and its
    variables as plain tf.Variables: the TFLite converter does not freeze Keras 3 variables
    tracked through the Keras model (it leaves uninitialised READ_VARIABLE ops)."""
    module = tf.Module()
    module.tf_variables = [v.value for v in model.variables]
    module.serve_uint8 = serving_function(model, tf.uint8)
    module.serve_float = serving_function(model, tf.float32)
    return module


def save_savedmodel(model, path):
    module = serving_module(model)
    signatures = {"serving_default": module.serve_uint8.get_concrete_function(),
                  "serving_float": module.serve_float.get_concrete_function()}
    tf.saved_model.save(module, path, signatures=signatures)


def save_keras(model, path):
    model.save(path, overwrite=True)


def tflite_bytes(model, quantize="none"):
    """The uint8 serving function as a TFLite flatbuffer (float, or dynamic-range quantised)."""
    module = serving_module(model)
    fn = module.serve_uint8.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    if quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        return converter.convert()
    except Exception as e:  # the converter's ConverterError is not public API
        raise RuntimeError(f"TFLite conversion failed ({one_line(e)})") from None


def save_tflite(model, path, quantize="none"):
    data = tflite_bytes(model, quantize)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


EXTENSIONS = {".keras": "keras", ".tflite": "tflite"}
# What a run folder of train_w_distill.py holds: an --out holding any of these is not an export.
RUN_ENTRIES = ("train_params.mat", "log.mat", "run_config.json", "ckpt")


def format_for(out, fmt=None):
    """``fmt``, or the one ``out``'s extension names (none: a SavedModel directory); checks that
    they agree, and refuses an extension this tool does not write (``x.onnx`` is no SavedModel)."""
    ext = os.path.splitext(os.path.normpath(out))[1].lower()
    if fmt is None and ext and ext not in EXTENSIONS:
        raise ValueError(f"--out {out}: export writes a .keras file, a .tflite file or a SavedModel "
                         f"directory (a name without extension), not {ext}; pass --format savedmodel "
                         f"to write a SavedModel under this name")
    fmt = fmt or EXTENSIONS.get(ext, "savedmodel")
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for extension, name in EXTENSIONS.items():
        if fmt == name and ext != extension:
            raise ValueError(f"--format {name} needs an --out ending in {extension}, got {out}")
    return fmt


def check_replaceable(out, fmt):
    """With ``--overwrite``, ``out`` must be an export of ``fmt`` (a SavedModel directory, a
    ``.keras`` or ``.tflite`` file), never a run folder or another directory the user keeps."""
    if os.path.isdir(out) and not os.path.islink(out):
        held = sorted(set(os.listdir(out)) & set(RUN_ENTRIES))
        if fmt != "savedmodel" or held or "saved_model.pb" not in os.listdir(out):
            what = f"it holds {', '.join(held)}" if held else "it is a directory but no SavedModel"
            raise ValueError(f"--out {out} is not an export ({what}); --overwrite replaces only an "
                             f"export, choose another --out")
    elif fmt == "savedmodel":
        raise ValueError(f"--out {out} is a file, not a SavedModel directory; --overwrite "
                         f"replaces only an export of the same format, choose another --out")


def _writable_dir(path):
    """Raise unless the directory ``path`` exists and is writable, or could be created."""
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"{path} is not a writable directory")


def check_request(out, fmt=None, quantize="none", overwrite=False):
    """Validate an export request before any work; returns the format."""
    fmt = format_for(out, fmt)
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize != "none" and fmt != "tflite":
        raise ValueError(f"--quantize {quantize} applies to --format tflite only (got --format {fmt})")
    if os.path.lexists(out):
        if not overwrite:
            raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
        check_replaceable(out, fmt)
    try:
        _writable_dir(os.path.dirname(os.path.abspath(out)))
    except OSError as e:
        raise OSError(f"--out {out}: cannot write there ({e})") from None
    return fmt


def export_model(model, out, fmt=None, quantize="none", overwrite=False):
    """Write ``model`` (a :class:`Classifier`) to ``out``; returns the format written."""
    fmt = check_request(out, fmt, quantize, overwrite)
    writers = {"savedmodel": lambda tmp: save_savedmodel(model, tmp),
               "keras": lambda tmp: save_keras(model, tmp),
               "tflite": lambda tmp: save_tflite(model, tmp, quantize)}
    try:
        write_atomically(out, writers[fmt], directory=fmt == "savedmodel")
    except OSError as e:
        raise OSError(f"--out {out}: cannot write it ({e})") from None
    return fmt


# ---------------------------------------------------------------------------------------------
# CLI

def define_flags(fv):
    """The export flags on ``fv`` (absl FlagValues)."""
    flags.DEFINE_string("params", None, "The .mat to export (e.g. <train_dir>/train_params.mat).",
                        flag_values=fv)
    flags.DEFINE_string("arch", None, "Network, e.g. WResNet-16-4 (default: read from the file).",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "Output path (a directory for savedmodel).", flag_values=fv)
    flags.DEFINE_enum("format", None, list(FORMATS), "Output format (default: from the --out extension).",
                      flag_values=fv)
    flags.DEFINE_integer("num_classes", None, "Number of classes (default: from <scope>/full/biases).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("image_size", 32, "Square input size, the training one (32: 3x3 stem; "
                         "else 7x7/2 stem).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_string("scope", None, "TF1 scope of the network in the file, Student or Teacher "
                        "(default: the only one).", flag_values=fv)
    flags.DEFINE_enum("quantize", "none", list(QUANTIZE), "tflite: none (float) or dynamic "
                      "(dynamic-range int8 weights).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=fv)
    flags.mark_flags_as_required(["params", "out"], flag_values=fv)


def run(fv, log=print):
    """Export as the flags ``fv`` say; returns the format written."""
    fmt = check_request(fv.out, fv.format, fv.quantize, fv.overwrite)
    arrays, scope = read_params(fv.params, fv.scope)
    model = build_classifier(arrays, scope, fv.arch, fv.num_classes, fv.image_size,
                             what=f"--params {fv.params}")
    export_model(model, fv.out, fmt, fv.quantize, fv.overwrite)
    kind = fmt + (", dynamic-range quantised" if fv.quantize == "dynamic" else "")
    h, w = model.image_size
    log(f"wrote {fv.out} ({kind}): {model.arch} ({scope}), {model.num_classes} classes, {h}x{w} images")
    return fmt


def main(argv=None):
    return tool_main("export", argv, define_flags, __doc__, run, (MatFileError, ParamsMismatchError) + ERRORS)


if __name__ == "__main__":
    sys.exit(main())
