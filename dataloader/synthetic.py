"""A generated, learnable, CIFAR-shaped dataset (the default ``--dataset synthetic``).

Each class is a *colour family* plus a *shape prototype*: classes ``2k`` and ``2k+1`` share the
hue of family ``k`` and differ in shape (ten shapes; beyond ten classes the shape is also drawn
striped or as an outline). Every image draws its shape at a random position, scale, aspect and
rotation, with hue/saturation/brightness jitter and a shading ramp, over a random background
(any hue, low saturation, gradient) with clutter blobs of arbitrary colours, plus pixel noise.
Colour alone therefore separates class pairs and shape separates the pair, so early features
group images by colour/edges and later ones by class (the layout the interpretability panels
show), while nearest-class-mean on raw pixels is well above chance but far from perfect.

Pure numpy and deterministic: the same arguments give identical bytes. The test split is drawn
from its own seed stream, so it does not change with ``train_per_class``.
"""
from __future__ import annotations

import numpy as np

SHAPES = ("disc", "square", "triangle", "ring", "plus", "diamond", "bars", "star", "crescent",
          "cross")
STYLES = ("solid", "striped", "outline")
# Hues (in turns) of the first colour families: red, green, blue, yellow, magenta, cyan, orange,
# violet; later families continue along the golden-ratio sequence.
_BASE_HUES = (0.0, 0.33, 0.61, 0.15, 0.83, 0.5, 0.07, 0.72)


def _family_hue(k):
    if k < len(_BASE_HUES):
        return _BASE_HUES[k]
    return (0.11 + 0.618034 * k) % 1.0


def class_names(num_classes):
    """Readable names like ``'family0-disc'`` (``-striped``/``-outline`` beyond ten classes)."""
    names = []
    for c in range(num_classes):
        style = STYLES[(c // len(SHAPES)) % len(STYLES)]
        names.append("family%d-%s%s" % (c // 2, SHAPES[c % len(SHAPES)],
                                         "" if style == "solid" else "-" + style))
    return tuple(names)


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, all inputs in [0, 1] (same shapes), output [..., 3]."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int32) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _shape_sdf(shape, u, v):
    """Signed distance (inside < 0) of a prototype in local units (the shape spans about [-1, 1])."""
    r = np.sqrt(u * u + v * v)
    if shape == "disc":
        return r - 0.95
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":  # equilateral, apex up (image v grows downwards)
        return np.maximum(np.abs(u) * 0.866 + v * 0.5, -v) - 0.45
    if shape == "ring":
        return np.abs(r - 0.72) - 0.26
    if shape == "plus":
        return np.minimum(np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0),
                          np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3))
    if shape == "diamond":
        return (np.abs(u) + np.abs(v)) * 0.7071 - 0.75
    if shape == "bars":
        return np.maximum(np.abs(u) - 1.0, np.abs(np.abs(v) - 0.5) - 0.22)
    if shape == "star":
        phi = np.arctan2(v, u)
        return r - (0.68 + 0.3 * np.cos(5.0 * phi))
    if shape == "crescent":
        return np.maximum(r - 0.95, 0.75 - np.sqrt((u - 0.45) ** 2 + (v + 0.2) ** 2))
    if shape == "cross":
        a, b = (u + v) * 0.7071, (u - v) * 0.7071
        return np.minimum(np.maximum(np.abs(a) - 0.28, np.abs(b) - 1.0),
                          np.maximum(np.abs(a) - 1.0, np.abs(b) - 0.28))
    raise ValueError("unknown synthetic shape %r" % (shape,))


def _render(labels, image_size, rng):
    """Draw one image per label; returns uint8 [N, S, S, 3]. Computed in float32."""
    n, s = len(labels), image_size
    f32 = np.float32

    def per_image(low, high):  # one uniform draw per image, broadcastable against [N, S, S]
        return rng.uniform(low, high, n).astype(f32)[:, None, None]

    grid = ((np.arange(s, dtype=f32) + 0.5) / s * 2 - 1)  # pixel centres in [-1, 1]
    x, y = grid[None, None, :], grid[None, :, None]
    px = f32(s / 2.0)  # pixels per normalised unit

    # Background: desaturated random colour, a linear ramp in a random direction.
    bg = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.4, n), rng.uniform(0.15, 0.85, n)).astype(f32)
    ang = per_image(0, 2 * np.pi)
    ramp = (np.cos(ang) * x + np.sin(ang) * y) * per_image(0.0, 0.25)
    img = np.clip(bg[:, None, None, :] + ramp[..., None], 0, 1)

    # Clutter: 2-4 blobs of arbitrary colour and size.
    for k in range(4):
        present = (rng.random(n) < (1.0 if k < 2 else 0.5)).astype(f32)[:, None, None]
        cx, cy, rad = per_image(-1, 1), per_image(-1, 1), per_image(0.08, 0.22)
        col = _hsv_to_rgb(rng.random(n), rng.uniform(0.3, 1.0, n), rng.uniform(0.2, 1.0, n)).astype(f32)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - rad
        alpha = np.clip(0.5 - d * px, 0, 1) * present
        img += alpha[..., None] * (col[:, None, None, :] - img)

    # Foreground: the class shape under a random similarity (+ aspect) transform.
    cx, cy = per_image(-0.3, 0.3), per_image(-0.3, 0.3)
    scale, aspect = per_image(0.38, 0.62), np.exp(per_image(-0.15, 0.15))
    theta = per_image(-np.pi / 6, np.pi / 6)
    ct, st = np.cos(theta), np.sin(theta)
    u = ((x - cx) * ct + (y - cy) * st) / (scale * aspect)
    v = (-(x - cx) * st + (y - cy) * ct) / (scale / aspect)
    family = labels // 2
    hue = np.array([_family_hue(k) for k in range(int(family.max()) + 1)])[family]
    fg = _hsv_to_rgb(hue + rng.normal(0.0, 0.025, n), rng.uniform(0.55, 1.0, n),
                     rng.uniform(0.55, 1.0, n)).astype(f32)
    shade = 1 + per_image(-0.15, 0.15) * u + per_image(-0.15, 0.15) * v
    sdf = np.empty((n, s, s), f32)
    shape_id = labels % len(SHAPES)
    style_id = (labels // len(SHAPES)) % len(STYLES)
    for i, name in enumerate(SHAPES):
        sel = shape_id == i
        if sel.any():
            sdf[sel] = _shape_sdf(name, u[sel], v[sel])
    sdf *= scale * px  # to pixels
    outline = style_id == 2
    sdf[outline] = np.abs(sdf[outline]) - 1.2
    alpha = np.clip(0.5 - sdf, 0, 1)
    striped = style_id == 1
    alpha[striped] *= np.sin(u[striped] * 12) > -0.3
    fg_img = np.clip(fg[:, None, None, :] * shade[..., None], 0, 1)
    img += alpha[..., None] * (fg_img - img)

    img += rng.standard_normal(img.shape, dtype=f32) * f32(0.04)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _split(num_classes, per_class, image_size, seed_seq):
    rng = np.random.default_rng(seed_seq)
    labels = rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int32), per_class))
    return _render(labels, image_size, rng), labels


def make_synthetic(num_classes=10, train_per_class=200, test_per_class=50, image_size=32, seed=0):
    """Generate the synthetic dataset; returns a :class:`dataloader.datasets.Dataset`.

    ``train_per_class``/``test_per_class`` images per class, uint8 ``image_size``² RGB images,
    int32 labels in shuffled order. Same arguments -> identical bytes.
    """
    from dataloader.datasets import Dataset

    for flag, value, low in (("num_classes", num_classes, 2), ("train_per_class", train_per_class, 1),
                             ("test_per_class", test_per_class, 1), ("image_size", image_size, 8),
                             ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError("synthetic dataset: %s must be an integer >= %d, got %r"
                             % (flag, low, value))
    train_seq, test_seq = np.random.SeedSequence([int(seed), 0x5E7]).spawn(2)
    train_images, train_labels = _split(num_classes, train_per_class, image_size, train_seq)
    test_images, test_labels = _split(num_classes, test_per_class, image_size, test_seq)
    return Dataset(train_images=train_images, train_labels=train_labels,
                   test_images=test_images, test_labels=test_labels,
                   num_classes=int(num_classes), name="synthetic",
                   class_names=class_names(num_classes))
