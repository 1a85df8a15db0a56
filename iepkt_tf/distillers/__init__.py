"""Distillation methods, one module each, over the interface of :mod:`iepkt_tf.distillers.base`.

``METHODS`` maps every ``--Distillation`` value to its class; adding a method is a module and one
line here (README, "Adding a method").
"""
from iepkt_tf.distillers.ab import AB
from iepkt_tf.distillers.at import AT
from iepkt_tf.distillers.co import CO
from iepkt_tf.distillers.ft import FT
from iepkt_tf.distillers.iep import IEP
from iepkt_tf.distillers.kd import KD
from iepkt_tf.distillers.mhgd import MHGD
from iepkt_tf.distillers.plain import Plain
from iepkt_tf.distillers.rkd import RKD

# In the order of the paper's Table 1 (KD, the control, after the plain student).
METHODS = {
    "None": Plain,
    "KD": KD,
    "AT": AT,
    "FT": FT,
    "AB": AB,
    "RKD": RKD,
    "MHGD": MHGD,
    "CO": CO,
    "IEP": IEP,
}


def build(name, student, teacher, **options):
    """``METHODS[name](student, teacher, options)`` with every option the method's flag default
    unless given (``init_epoch`` defaults to the method's)."""
    cls = METHODS[name]
    values = {f.name: f.default for f in cls.flags}
    values["init_epoch"] = cls.default_init_epoch
    unknown = sorted(set(options) - set(values) - {"image_size"})
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; known: {sorted(values)}")
    values.update(options)
    return cls(student, teacher, values)
