"""``--dataset synthetic_parts``: a generated CIFAR-shaped task on which distillation is measurable.

Each class is a *constellation*: three parts (a shape of :data:`dataloader.synthetic.SHAPES` in one
of :data:`HUES`) at class-specific positions. Parts come from one shared vocabulary and every set
of parts serves two classes that differ only by where the parts sit (``LAYOUTS``), so the parts
alone never name the class: a network has to recognise the parts *and* their arrangement, which rewards depth and width (a deeper/wider teacher is clearly
better than a small student) and needs many examples (accuracy falls steeply with the sample
rate, as on CIFAR-100). Every image draws its constellation under a random shift, scale and
rotation, jitters each part's position, size, hue and brightness, drops one part now and then,
and adds distractor parts from the same vocabulary, clutter blobs, a random background ramp and
pixel noise.

The classes are fixed by ``seed`` (default 0), not by the run's ``--seed``: the teacher and every
student of an experiment see the same task, and seeds vary only initialisation, data order and
the sample-rate subset. Pure numpy, deterministic (same arguments -> identical bytes), about 2 s
for the default 7,000 images. The test split has its own seed stream, so it does not change with
``train_per_class``.
"""
from __future__ import annotations

import numpy as np

from dataloader.synthetic import SHAPES, _hsv_to_rgb, _shape_sdf

# Hues (turns) of the part vocabulary: red, yellow, green, cyan, blue, magenta.
HUES = (0.0, 0.15, 0.33, 0.5, 0.64, 0.83)
NUM_PARTS = 3          # parts per class
LAYOUTS = 2            # classes with the same parts, told apart by their arrangement only
NUM_DISTRACTORS = 3    # at most this many vocabulary parts drawn at random places per image
DROP_PROB = 0.2        # probability that an image misses one of its class parts
DEFAULTS = dict(num_classes=40, train_per_class=125, test_per_class=50, image_size=32, seed=0)


def class_names(num_classes, seed=0):
    """Readable names, e.g. ``'c03:red-disc+blue-ring+green-star'``."""
    return tuple("c%02d:" % c + "+".join("%s-%s" % (_HUE_NAMES[h], SHAPES[s]) for s, h, _, _ in parts)
                 for c, parts in enumerate(class_parts(num_classes, seed)))


_HUE_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")


def class_parts(num_classes, seed=0):
    """Per class ``NUM_PARTS`` tuples ``(shape id, hue id, x, y)``, positions in [-1, 1] units.

    Part types are dealt from repeated shuffles of the vocabulary, so every type is used about
    equally often and classes share types; each set of types serves ``LAYOUTS`` consecutive
    classes that differ only in where the parts sit (positions at least 0.55 apart).
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC1A55]))
    vocab = [(s, h) for s in range(len(SHAPES)) for h in range(len(HUES))]
    deck = []
    classes, seen = [], set()
    while len(classes) < num_classes:
        if len(deck) < NUM_PARTS:
            deck += [vocab[i] for i in rng.permutation(len(vocab))]
        types = [deck.pop() for _ in range(NUM_PARTS)]
        if len(set(types)) < NUM_PARTS or frozenset(types) in seen:
            continue
        seen.add(frozenset(types))
        for _ in range(min(LAYOUTS, num_classes - len(classes))):
            while True:
                pos = rng.uniform(-0.55, 0.55, (NUM_PARTS, 2))
                d = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1)) + np.eye(NUM_PARTS) * 9
                if d.min() >= 0.55:
                    break
            classes.append(tuple((int(s), int(h), float(x), float(y))
                                 for (s, h), (x, y) in zip(types, pos)))
    return tuple(classes)


def _draw_parts(img, shape_id, hue_id, cx, cy, radius, present, rng, grid, px):
    """Paint one part per image (vectorised over images) onto ``img`` [N, S, S, 3] in place."""
    n = len(shape_id)
    x, y = grid
    theta = rng.uniform(-0.5, 0.5, n).astype(np.float32)[:, None, None]
    ct, st = np.cos(theta), np.sin(theta)
    r = radius[:, None, None]
    u = ((x - cx[:, None, None]) * ct + (y - cy[:, None, None]) * st) / r
    v = (-(x - cx[:, None, None]) * st + (y - cy[:, None, None]) * ct) / r
    sdf = np.full(u.shape, 9.0, np.float32)
    for i, name in enumerate(SHAPES):
        sel = shape_id == i
        if sel.any():
            sdf[sel] = _shape_sdf(name, u[sel], v[sel])
    alpha = np.clip(0.5 - sdf * r * px, 0, 1) * present[:, None, None]
    hue = np.asarray(HUES, np.float32)[hue_id] + rng.normal(0, 0.02, n).astype(np.float32)
    col = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0, n), rng.uniform(0.6, 1.0, n)).astype(np.float32)
    img += alpha[..., None] * (col[:, None, None, :] - img)


def _render(labels, parts, image_size, rng):
    """uint8 [N, S, S, 3] images of the constellations of ``labels``."""
    n, s, f32 = len(labels), image_size, np.float32
    g = (np.arange(s, dtype=f32) + 0.5) / s * 2 - 1
    grid, px = (g[None, None, :], g[None, :, None]), f32(s / 2.0)

    def u(lo, hi):  # one uniform draw per image
        return rng.uniform(lo, hi, n).astype(f32)

    bg = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.35, n), rng.uniform(0.2, 0.8, n)).astype(f32)
    ang = u(0, 2 * np.pi)[:, None, None]
    ramp = (np.cos(ang) * grid[0] + np.sin(ang) * grid[1]) * u(0.0, 0.3)[:, None, None]
    img = np.clip(bg[:, None, None, :] + ramp[..., None], 0, 1)
    for _ in range(3):  # clutter blobs of any colour
        cx, cy, rad = u(-1, 1), u(-1, 1), u(0.05, 0.15)
        col = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.6, n), rng.uniform(0.2, 1.0, n)).astype(f32)
        d = np.sqrt((grid[0] - cx[:, None, None]) ** 2 + (grid[1] - cy[:, None, None]) ** 2)
        alpha = np.clip(0.5 - (d - rad[:, None, None]) * px, 0, 1) * (rng.random(n) < 0.7)[:, None, None]
        img += alpha[..., None] * (col[:, None, None, :] - img)

    table = np.asarray(parts, f32)[labels]            # [N, NUM_PARTS, 4]
    for _ in range(NUM_DISTRACTORS):                  # vocabulary parts at random places
        _draw_parts(img, rng.integers(0, len(SHAPES), n), rng.integers(0, len(HUES), n),
                    u(-0.9, 0.9), u(-0.9, 0.9), u(0.16, 0.28), (rng.random(n) < 0.7).astype(f32),
                    rng, grid, px)
    shift_x, shift_y, scale = u(-0.2, 0.2), u(-0.2, 0.2), u(0.8, 1.15)
    rot = u(-0.35, 0.35)
    dropped = np.where(rng.random(n) < DROP_PROB, rng.integers(0, NUM_PARTS, n), -1)
    for p in range(NUM_PARTS):
        x, y = table[:, p, 2], table[:, p, 3]
        cx = scale * (np.cos(rot) * x - np.sin(rot) * y) + shift_x + u(-0.07, 0.07)
        cy = scale * (np.sin(rot) * x + np.cos(rot) * y) + shift_y + u(-0.07, 0.07)
        _draw_parts(img, table[:, p, 0].astype(np.int64), table[:, p, 1].astype(np.int64), cx, cy,
                    scale * u(0.22, 0.3), (dropped != p).astype(f32), rng, grid, px)
    img *= (1 + u(-0.2, 0.2))[:, None, None, None]
    img += rng.standard_normal(img.shape, dtype=f32) * f32(0.05)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def make_synthetic_parts(num_classes=DEFAULTS["num_classes"], train_per_class=DEFAULTS["train_per_class"],
                         test_per_class=DEFAULTS["test_per_class"], image_size=DEFAULTS["image_size"],
                         seed=DEFAULTS["seed"]):
    """The constellation task as a :class:`dataloader.datasets.Dataset` (labels in shuffled order).

    Defaults: 40 classes (20 part sets x 2 layouts), 125 training and 50 test images per class
    (5,000 / 2,000; one test image = 0.05 points), 32x32. Same arguments -> identical bytes.
    """
    from dataloader.datasets import Dataset

    for flag, value, low in (("num_classes", num_classes, 2), ("train_per_class", train_per_class, 1),
                             ("test_per_class", test_per_class, 1), ("image_size", image_size, 8),
                             ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError("synthetic_parts dataset: %s must be an integer >= %d, got %r"
                             % (flag, low, value))
    parts = class_parts(num_classes, seed)
    splits = []
    for seq, per_class in zip(np.random.SeedSequence([int(seed), 0x9A7]).spawn(2),
                              (train_per_class, test_per_class)):
        rng = np.random.default_rng(seq)
        labels = rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int32), per_class))
        splits += [_render(labels, parts, image_size, rng), labels]
    return Dataset(*splits, num_classes=int(num_classes), name="synthetic_parts",
                   class_names=class_names(num_classes, seed))
