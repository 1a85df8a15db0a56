"""``--Distillation None``: the main network alone on cross-entropy (the authors' baseline)."""
from __future__ import annotations

from iepkt_tf.distillers.base import Distiller


class Plain(Distiller):
    """No teacher, no terms: the main step is cross-entropy + weight decay."""
    name = "None"
    needs_teacher = False
