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
the sample-rate subset. Pure numpy, deterministic (same arguments -> identical bytes), about 1-2 s
for the default 7,000 images and 8-10 s for CIFAR-100's size (100 classes x 500 / 100 images, the
``cpu_table1`` preset; the vocabulary's 60 part types give 34,220 part sets, of which 100 classes
use 50). The test split has its own seed stream, so it does not change with ``train_per_class``.
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


def class_names(num_classes, seed=0, layouts=LAYOUTS):
    """Readable names, e.g. ``'c03:red-disc+blue-ring+green-star'``."""
    return tuple("c%02d:" % c + "+".join("%s-%s" % (_HUE_NAMES[h], SHAPES[s]) for s, h, _, _ in parts)
                 for c, parts in enumerate(class_parts(num_classes, seed, layouts)))


_HUE_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")


def max_classes(layouts=LAYOUTS):
    """The most classes the deck can deal: every set of ``NUM_PARTS`` distinct part types, each
    in ``layouts`` arrangements."""
    from math import comb

    return comb(len(SHAPES) * len(HUES), NUM_PARTS) * layouts


def class_parts(num_classes, seed=0, layouts=LAYOUTS):
    """Per class ``NUM_PARTS`` tuples ``(shape id, hue id, x, y)``, positions in [-1, 1] units.

    Part types are dealt from repeated shuffles of the vocabulary, so every type is used about
    equally often and classes share types; each set of types serves ``layouts`` (default
    ``LAYOUTS``; ``--synthetic_layouts``) consecutive
    classes that differ only in where the parts sit (positions at least 0.55 apart).
    """
    if num_classes > max_classes(layouts):
        raise ValueError(f"synthetic_parts dataset: at most {max_classes(layouts)} classes with "
                         f"{layouts} layouts, got {num_classes}")
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
        for _ in range(min(layouts, num_classes - len(classes))):
            while True:
                pos = rng.uniform(-0.55, 0.55, (NUM_PARTS, 2))
                d = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1)) + np.eye(NUM_PARTS) * 9
                if d.min() >= 0.55:
                    break
            classes.append(tuple((int(s), int(h), float(x), float(y))
                                 for (s, h), (x, y) in zip(types, pos)))
    return tuple(classes)


def _part_draws(shape_id, hue_id, cx, cy, radius, present, rng):
    """The random draws of one part per image (rotation, hue jitter, saturation, value), in the
    order the renderer has always made them; returns the part's per-image parameters."""
    n = len(shape_id)
    theta = rng.uniform(-0.5, 0.5, n).astype(np.float32)
    hue = np.asarray(HUES, np.float32)[hue_id] + rng.normal(0, 0.02, n).astype(np.float32)
    col = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0, n), rng.uniform(0.6, 1.0, n)).astype(np.float32)
    return dict(shape_id=shape_id, cx=cx, cy=cy, radius=radius, present=present, theta=theta,
                col=col)


def _draw_parts(img, part, sl, grid, px):
    """Paint one part per image of the slice ``sl`` of ``part`` (see :func:`_part_draws`) onto
    ``img`` [n, 3, S, S] (channels first) in place (vectorised over the images)."""
    x, y = grid
    shape_id = part["shape_id"][sl]
    theta = part["theta"][sl][:, None, None]
    ct, st = np.cos(theta), np.sin(theta)
    r = part["radius"][sl][:, None, None]
    cx, cy = part["cx"][sl][:, None, None], part["cy"][sl][:, None, None]
    u = ((x - cx) * ct + (y - cy) * st) / r
    v = (-(x - cx) * st + (y - cy) * ct) / r
    sdf = np.full(u.shape, 9.0, np.float32)
    for i, name in enumerate(SHAPES):
        sel = shape_id == i
        if sel.any():
            sdf[sel] = _shape_sdf(name, u[sel], v[sel])
    alpha = np.clip(0.5 - sdf * r * px, 0, 1) * part["present"][sl][:, None, None]
    img += alpha[:, None] * (part["col"][sl][:, :, None, None] - img)


def _draws(labels, parts, rng):
    """Every per-image random parameter of :func:`_render` except the pixel noise, drawn from
    ``rng`` in one fixed order (the order of the original one-pass renderer, so the images do not
    depend on how they are painted in chunks)."""
    n, f32 = len(labels), np.float32

    def u(lo, hi):  # one uniform draw per image
        return rng.uniform(lo, hi, n).astype(f32)

    d = {"bg": _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.35, n),
                           rng.uniform(0.2, 0.8, n)).astype(f32)}
    d["ang"] = u(0, 2 * np.pi)
    d["ramp"] = u(0.0, 0.3)
    d["clutter"] = []
    for _ in range(3):  # clutter blobs of any colour
        cx, cy, rad = u(-1, 1), u(-1, 1), u(0.05, 0.15)
        col = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.6, n), rng.uniform(0.2, 1.0, n)).astype(f32)
        d["clutter"].append((cx, cy, rad, col, rng.random(n) < 0.7))
    table = np.asarray(parts, f32)[labels]            # [N, NUM_PARTS, 4]
    d["parts"] = []
    for _ in range(NUM_DISTRACTORS):                  # vocabulary parts at random places
        d["parts"].append(_part_draws(
            rng.integers(0, len(SHAPES), n), rng.integers(0, len(HUES), n), u(-0.9, 0.9),
            u(-0.9, 0.9), u(0.16, 0.28), (rng.random(n) < 0.7).astype(f32), rng))
    shift_x, shift_y, scale = u(-0.2, 0.2), u(-0.2, 0.2), u(0.8, 1.15)
    rot = u(-0.35, 0.35)
    dropped = np.where(rng.random(n) < DROP_PROB, rng.integers(0, NUM_PARTS, n), -1)
    for p in range(NUM_PARTS):
        x, y = table[:, p, 2], table[:, p, 3]
        cx = scale * (np.cos(rot) * x - np.sin(rot) * y) + shift_x + u(-0.07, 0.07)
        cy = scale * (np.sin(rot) * x + np.cos(rot) * y) + shift_y + u(-0.07, 0.07)
        d["parts"].append(_part_draws(table[:, p, 0].astype(np.int64), table[:, p, 1].astype(np.int64),
                                      cx, cy, scale * u(0.22, 0.3), (dropped != p).astype(f32), rng))
    d["gain"] = 1 + u(-0.2, 0.2)
    return d


CHUNK = 256    # images painted at a time: the per-pixel arrays stay in the CPU's cache
THREADS = 2    # threads painting chunks (numpy releases the GIL); the bytes do not depend on it


def _paint(d, sl, noise, grid, px):
    """uint8 [n, S, S, 3] images of the slice ``sl`` of the draws ``d``, with ``noise`` [n, S, S, 3]."""
    ang = d["ang"][sl][:, None, None]
    ramp = (np.cos(ang) * grid[0] + np.sin(ang) * grid[1]) * d["ramp"][sl][:, None, None]
    img = np.clip(d["bg"][sl][:, :, None, None] + ramp[:, None], 0, 1)   # [n, 3, S, S]
    for cx, cy, rad, col, on in d["clutter"]:
        dist = np.sqrt((grid[0] - cx[sl][:, None, None]) ** 2 + (grid[1] - cy[sl][:, None, None]) ** 2)
        alpha = np.clip(0.5 - (dist - rad[sl][:, None, None]) * px, 0, 1) * on[sl][:, None, None]
        img += alpha[:, None] * (col[sl][:, :, None, None] - img)
    for part in d["parts"]:
        _draw_parts(img, part, sl, grid, px)
    img *= d["gain"][sl][:, None, None, None]
    img += noise.transpose(0, 3, 1, 2) * np.float32(0.05)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _render(labels, parts, image_size, rng):
    """uint8 [N, S, S, 3] images of the constellations of ``labels``.

    The per-image parameters are drawn first (:func:`_draws`), then the images are painted
    ``CHUNK`` at a time on ``THREADS`` threads, channels first (numpy's inner loops then run over
    image rows instead of the 3 channels), while this thread draws the pixel noise chunk by chunk
    in order (the same stream as one draw of the whole array). Every pixel is the same
    element-wise float32 computation as in one pass over all images in [N, S, S, 3], so the bytes
    depend neither on ``CHUNK``, ``THREADS`` nor on the layout (``tests/test_synthetic_parts.py``
    holds the default task's hash).
    """
    from concurrent.futures import ThreadPoolExecutor

    n, s, f32 = len(labels), image_size, np.float32
    g = (np.arange(s, dtype=f32) + 0.5) / s * 2 - 1
    grid, px = (g[None, None, :], g[None, :, None]), f32(s / 2.0)
    d = _draws(labels, parts, rng)
    out = np.empty((n, s, s, 3), np.uint8)

    def paint(sl, noise):
        out[sl] = _paint(d, sl, noise, grid, px)

    with ThreadPoolExecutor(max(1, THREADS)) as pool:
        pending = []
        for lo in range(0, n, CHUNK):
            sl = slice(lo, min(n, lo + CHUNK))
            pending.append(pool.submit(paint, sl, rng.standard_normal((sl.stop - lo, s, s, 3), dtype=f32)))
            while len(pending) > 2 * max(1, THREADS):   # bounded memory: a few chunks in flight
                pending.pop(0).result()
        for p in pending:
            p.result()
    return out


def make_synthetic_parts(num_classes=DEFAULTS["num_classes"], train_per_class=DEFAULTS["train_per_class"],
                         test_per_class=DEFAULTS["test_per_class"], image_size=DEFAULTS["image_size"],
                         seed=DEFAULTS["seed"], layouts=LAYOUTS):
    """The constellation task as a :class:`dataloader.datasets.Dataset` (labels in shuffled order).

    Defaults: 40 classes (20 part sets x 2 layouts), 125 training and 50 test images per class
    (5,000 / 2,000; one test image = 0.05 points), 32x32. Same arguments -> identical bytes.
    ``layouts`` classes share each part set (more of them: a harder task, told apart by the
    arrangement alone; the default 2 keeps the task's bytes as they have always been).
    """
    from dataloader.datasets import Dataset

    for flag, value, low in (("num_classes", num_classes, 2), ("train_per_class", train_per_class, 1),
                             ("test_per_class", test_per_class, 1), ("image_size", image_size, 8),
                             ("seed", seed, 0), ("layouts", layouts, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError("synthetic_parts dataset: %s must be an integer >= %d, got %r"
                             % (flag, low, value))
    parts = class_parts(num_classes, seed, layouts)
    splits = []
    for seq, per_class in zip(np.random.SeedSequence([int(seed), 0x9A7]).spawn(2),
                              (train_per_class, test_per_class)):
        rng = np.random.default_rng(seq)
        labels = rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int32), per_class))
        splits += [_render(labels, parts, image_size, rng), labels]
    return Dataset(*splits, num_classes=int(num_classes), name="synthetic_parts",
                   class_names=class_names(num_classes, seed, layouts))
