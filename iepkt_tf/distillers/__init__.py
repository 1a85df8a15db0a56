"""Distillation methods, one module each, over the interface of :mod:`iepkt_tf.distillers.base`."""
