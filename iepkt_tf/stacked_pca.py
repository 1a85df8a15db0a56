"""First PCA of the stacked PCA: the leading singular triplet of each feature map.

Mirrors the authors' ``SVP.SVD_eid`` / ``SVP.gradient_svd`` and EKI lines 35-51 of
``Distillation.py``. A feature map ``[B, H, W, C]`` is read as ``B`` matrices ``x`` of size
``HW x C``:

* ``2/3 < HW/C < 3/2`` (strict, SVP.py line 21): a full thin SVD of ``stop_gradient(x)``, so no
  gradient reaches ``x`` (``near_square_grad="stop"``, the authors' behaviour).
* ``C <= HW``: decompose the Gram matrix ``x^T x`` (``'gram_xtx'``), ``u = x v``, ``s = |u|``.
* ``HW < C``: decompose ``x x^T`` (``'gram_xxt'``), ``v = x^T u``, ``s = |v|``.

The Gram branches use ``tf.linalg.eigh`` (eigenvalues reordered to descending) where the authors
call ``tf.svd`` on the symmetric Gram matrix: same vectors up to sign, 3-6x cheaper. They carry the
authors' gradient (``gradient_svd``) through ``tf.custom_gradient``: only the ``V`` cotangent is used
(``ds``, ``dU`` are ignored), ``right_grad`` when ``C <= HW``, ``left_grad`` otherwise, with
``K_ij = 1/(s_i^2 - s_j^2)`` and non-finite entries set to zero. All decomposition work is float32.

That published gradient is not the derivative of ``V``: ``right_grad`` is exactly twice it, and
``left_grad`` differs from it by a non-constant factor (checked against finite differences in
tests/test_stacked_pca.py). It is kept as the default for parity; ``grad="exact"`` gives the true
derivative. In IEP no gradient ever passes through this op (only the teacher is decomposed).

Signs of singular vectors are whatever the decomposition returns (as in ``SVD_eid``);
:func:`first_pca` applies the authors' convention afterwards.
"""
from __future__ import annotations

import tensorflow as tf

NEAR_SQUARE_GRADS = ("stop", "true", "override")


def branch_of(hw, c):
    """Which decomposition ``SVD_eid`` uses for an ``hw x c`` matrix (SVP.py lines 21-41)."""
    hw, c = int(hw), int(c)
    if hw / c < 3 / 2 and 2 / 3 < hw / c:
        return "svd"
    return "gram_xxt" if hw < c else "gram_xtx"


def _removenan(x):
    """SVP.removenan: non-finite entries -> 0."""
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


def _authors_svd_grad(s, u, v, dv):
    """SVP.gradient_svd for ``x = u diag(s) v^T``: ``dx [B,HW,C]`` from the ``v`` cotangent only.

    ``s [B,K]``, ``u [B,HW,K]``, ``v [B,C,K]``, ``dv [B,C,K]``; ``left_grad`` when ``C > HW``.
    """
    k = s.shape[-1]
    s2 = tf.square(s)
    eye = tf.eye(k, dtype=s.dtype)
    kmat = (1.0 - eye) / (s2[:, :, None] - s2[:, None, :] + eye)
    kt = _removenan(tf.linalg.matrix_transpose(kmat))

    def msym(a):
        return a + tf.linalg.matrix_transpose(a)

    hw, c = u.shape[1], v.shape[1]
    if c > hw:
        # left_grad: the roles of (u, v) are swapped; D = dv diag(1/(s+1e-8)).
        d = dv * (1.0 / (s + 1e-8))[:, None, :]
        dtv = tf.matmul(d, v, transpose_a=True) * s[:, None, :]             # D^T U' S
        inner = tf.linalg.diag(tf.linalg.diag_part(tf.matmul(v, d, transpose_a=True))) \
            + 2.0 * s[:, :, None] * msym(kt * dtv)                          # diag(U'^T D) + 2 S msym
        grad = tf.matmul(d - tf.matmul(v, inner), u, transpose_b=True)      # [B,C,HW]
        return tf.linalg.matrix_transpose(grad)
    # right_grad: 2 U S msym(K^T o (V^T dV)) V^T.
    core = s[:, :, None] * msym(kt * tf.matmul(v, dv, transpose_a=True))
    return tf.matmul(2.0 * tf.matmul(u, core), v, transpose_b=True)


def _exact_svd_grad(s, u, v, ds, du, dv):
    """The exact derivative of the thin SVD ``x = u diag(s) v^T`` (Townsend 2016, "Differentiating
    the singular value decomposition"), with non-finite ``1/(s_j^2 - s_i^2)`` and ``1/s`` set to 0."""
    k = s.shape[-1]
    ds = tf.zeros_like(s) if ds is None else ds
    du = tf.zeros_like(u) if du is None else du
    dv = tf.zeros_like(v) if dv is None else dv
    s2 = tf.square(s)
    eye = tf.eye(k, dtype=s.dtype)
    f = _removenan((1.0 - eye) / (s2[:, None, :] - s2[:, :, None] + eye))   # F_ij = 1/(s_j^2 - s_i^2)
    s_inv = _removenan(1.0 / s)
    utdu = tf.matmul(u, du, transpose_a=True)
    vtdv = tf.matmul(v, dv, transpose_a=True)
    inner = (f * (utdu - tf.linalg.matrix_transpose(utdu))) * s[:, None, :] + tf.linalg.diag(ds) \
        + s[:, :, None] * (f * (vtdv - tf.linalg.matrix_transpose(vtdv)))
    grad = tf.matmul(tf.matmul(u, inner), v, transpose_b=True)
    # Components outside span(u) (tall x) and span(v) (wide x).
    du_perp = (du - tf.matmul(u, utdu)) * s_inv[:, None, :]
    dv_perp = (dv - tf.matmul(v, vtdv)) * s_inv[:, None, :]
    return grad + tf.matmul(du_perp, v, transpose_b=True) + tf.matmul(u, dv_perp, transpose_b=True)


@tf.custom_gradient
def _svd_grad_map_authors(x, s, u, v):
    """SVP.SVD_grad_map: identity on ``(s, u, v)`` whose gradient to ``x`` is ``gradient_svd``.

    ``s, u, v`` are computed from ``stop_gradient(x)``; no variables are read here (keras #18139).
    """
    def grad(ds, du, dv):
        del ds, du  # the authors' gradient ignores them
        if dv is None:
            return None, None, None, None
        return _authors_svd_grad(s, u, v, dv), None, None, None

    return (tf.identity(s), tf.identity(u), tf.identity(v)), grad


@tf.custom_gradient
def _svd_grad_map_exact(x, s, u, v):
    """Identity on ``(s, u, v)`` whose gradient to ``x`` is the exact SVD derivative."""
    def grad(ds, du, dv):
        if ds is None and du is None and dv is None:
            return None, None, None, None
        return _exact_svd_grad(s, u, v, ds, du, dv), None, None, None

    return (tf.identity(s), tf.identity(u), tf.identity(v)), grad


_GRAD_MAPS = {"authors": _svd_grad_map_authors, "exact": _svd_grad_map_exact}


def _gram_decomposition(x_, hw, c):
    """Thin SVD of ``x_`` [B,HW,C] through the smaller Gram matrix (SVP.py lines 27-41)."""
    if hw < c:
        xxt = tf.matmul(x_, x_, transpose_b=True)
        _, u = tf.linalg.eigh(xxt)
        u = tf.reverse(u, axis=[-1])                                 # descending eigenvalues
        v = tf.matmul(x_, u, transpose_a=True)                       # [B,C,HW]
        s = tf.linalg.norm(v, axis=1)
        v = _removenan(v / s[:, None, :])
    else:
        xtx = tf.matmul(x_, x_, transpose_a=True)
        _, v = tf.linalg.eigh(xtx)
        v = tf.reverse(v, axis=[-1])
        u = tf.matmul(x_, v)                                         # [B,HW,C]
        s = tf.linalg.norm(u, axis=1)
        u = _removenan(u / s[:, None, :])
    return s, u, v


def _as_matrices(x, what):
    x = tf.convert_to_tensor(x)
    if x.shape.rank == 4:
        _, h, w, c = x.shape
        if None in (h, w, c):
            raise ValueError(f"{what}: H, W and C must be static, got shape {x.shape}")
        return tf.reshape(x, [-1, h * w, c])
    if x.shape.rank == 3:
        if None in x.shape[1:]:
            raise ValueError(f"{what}: HW and C must be static, got shape {x.shape}")
        return x
    raise ValueError(f"{what}: expected a [B,H,W,C] or [B,HW,C] feature map, got shape {x.shape}")


def svd_eid(x, n=1, near_square_grad="stop", grad="authors"):
    """SVP.SVD_eid: the leading ``n`` singular triplets of every sample of ``x``.

    Args:
      x: ``[B,H,W,C]`` or ``[B,HW,C]``.
      n: number of components kept.
      near_square_grad: gradient of the full-SVD branch. ``"stop"``: none (the authors: the SVD
        reads ``stop_gradient(x)``); ``"true"``: TF's own SVD gradient; ``"override"``: the
        ``grad`` formula (the authors register ``gradient_svd`` as the ``Svd_`` override but never
        let it reach ``x``).
      grad: the custom gradient of the Gram branches. ``"authors"``: ``gradient_svd`` as published
        (it uses only ``dV``; for ``C <= HW`` it is exactly twice the true derivative of ``V``, for
        ``C > HW`` (``left_grad``) it is not proportional to it); ``"exact"``: the exact SVD
        derivative from all of ``ds, dU, dV``.

    Returns:
      ``s [B,n]`` (l2-normalised, so ``s == 1`` for ``n = 1``), ``U [B,HW,n]``, ``V [B,C,n]``,
      each l2-normalised over axis 1 (SVP.py lines 47-49), in ``x``'s dtype.
    """
    if grad not in _GRAD_MAPS:
        raise ValueError(f"grad must be one of {tuple(_GRAD_MAPS)}, got {grad!r}")
    grad_map = _GRAD_MAPS[grad]
    if near_square_grad not in NEAR_SQUARE_GRADS:
        raise ValueError(f"near_square_grad must be one of {NEAR_SQUARE_GRADS}, got {near_square_grad!r}")
    x = _as_matrices(x, "svd_eid")
    dtype = x.dtype
    _, hw, c = x.shape
    n = int(n)
    if not 1 <= n <= min(hw, c):
        raise ValueError(f"svd_eid: n must be in [1, {min(hw, c)}], got {n}")
    x32 = tf.cast(x, tf.float32)
    x_ = tf.stop_gradient(x32)

    if branch_of(hw, c) == "svd":
        if near_square_grad == "true":
            s, u, v = tf.linalg.svd(x32, full_matrices=False)
        else:
            s, u, v = tf.linalg.svd(x_, full_matrices=False)
            if near_square_grad == "override":
                s, u, v = grad_map(x32, s, u, v)
    else:
        s, u, v = _gram_decomposition(x_, hw, c)
        s, u, v = grad_map(x32, s, u, v)

    s = tf.math.l2_normalize(s[:, :n], axis=1)
    u = tf.math.l2_normalize(u[:, :, :n], axis=1)
    v = tf.math.l2_normalize(v[:, :, :n], axis=1)
    return tf.cast(s, dtype), tf.cast(u, dtype), tf.cast(v, dtype)


# Leading eigenvector by repeated squaring (first_pca's no-gradient path, used for the teacher).
LEADING_MAX_SQUARINGS = 8      # A^(2^8): beyond this the batch falls back to eigh
LEADING_DOMINANCE = 1e-2       # squared until v^T A v >= 1 - this, A = G^(2^k) / trace
LEADING_REFINEMENTS = 4        # then v <- normalize(A v): each shrinks the error by <= 0.0101


def leading_eigenvector(gram, max_squarings=LEADING_MAX_SQUARINGS, dominance=LEADING_DOMINANCE):
    """Unit eigenvector of the largest eigenvalue of every symmetric PSD matrix in ``gram [B,n,n]``
    (``[B,n,1]``, float32, sign arbitrary) -- what ``eigh(gram)[1][..., -1:]`` returns, cheaper.

    ``A = G / tr G`` is squared (and renormalised to trace 1) until, for every sample, the
    iterate ``v = normalize(A 1)`` carries almost all of ``A``'s trace: ``v^T A v >= 1 - dominance``
    (A is PSD with trace 1, so this forces every other eigenvalue of ``A`` below
    ``dominance / (1 - dominance)`` of the top one); ``LEADING_REFINEMENTS`` products
    ``v <- normalize(A v)`` (matrix-vector, cheap) then shrink the remaining error by that ratio
    each, to float32 rounding. Squarings are the costly part, so few are done. The start vector ``1`` suits post-ReLU feature maps, whose
    leading vector is non-negative. Samples with ``G = 0`` get eigh's vector for a zero matrix
    (the last unit vector). If some sample has not converged after
    ``max_squarings`` (a near-tie of the two largest eigenvalues), the whole batch is decomposed
    with ``tf.linalg.eigh`` instead, so the result is never less accurate than eigh's.
    WRN-40-4's three teacher points at batch 128 (random init): 128 ms through eigh, 37 ms this
    way (Gram products included), the vectors equal to 2e-7.
    """
    g = tf.cast(tf.convert_to_tensor(gram), tf.float32)
    tr = tf.linalg.trace(g)[:, None, None]
    empty = tr[:, 0, 0] <= 0.0
    a0 = tf.math.divide_no_nan(g, tr)

    def iterate(a):
        v = tf.math.l2_normalize(tf.reduce_sum(a, axis=-1, keepdims=True), axis=1)   # A 1
        rayleigh = tf.reduce_sum(v * tf.matmul(a, v), axis=[1, 2])
        return v, tf.reduce_all((rayleigh >= 1.0 - dominance) | empty)

    def cond(k, a, done):
        return tf.logical_and(k < max_squarings, tf.logical_not(done))

    def body(k, a, done):
        a = tf.matmul(a, a)
        a = tf.math.divide_no_nan(a, tf.linalg.trace(a)[:, None, None])
        return k + 1, a, iterate(a)[1]

    _, a, done = tf.while_loop(cond, body, (tf.constant(0), a0, iterate(a0)[1]))

    def refined():
        v = iterate(a)[0]
        for _ in range(LEADING_REFINEMENTS):
            v = tf.math.l2_normalize(tf.matmul(a, v), axis=1)
        # eigh's answer for G = 0 (the identity's last column), so zero maps decompose as before.
        last = tf.one_hot(tf.shape(g)[-1] - 1, tf.shape(g)[-1], dtype=tf.float32)[:, None]
        return tf.where(empty[:, None, None], last[None], v)

    def by_eigh():
        return tf.linalg.eigh(g)[1][..., -1:]

    return tf.cond(done, refined, by_eigh)


def leading_singular_vectors(x):
    """The leading left/right singular vectors ``(u [B,HW,1], v [B,C,1])`` of ``x [B,HW,C]`` the way
    ``svd_eid(x, 1)`` computes them for the Gram branches (smaller Gram matrix, the other vector by
    a product, ``removenan`` of ``0/0``), with :func:`leading_eigenvector` in place of eigh. No
    gradient. For the near-square branch (a full SVD in the authors' code) it calls ``svd_eid``."""
    x = tf.stop_gradient(_as_matrices(x, "leading_singular_vectors"))
    dtype = x.dtype
    _, hw, c = x.shape
    if branch_of(hw, c) == "svd":
        _, u, v = svd_eid(x, 1)
        return u, v
    x_ = tf.cast(x, tf.float32)
    if hw < c:
        u = leading_eigenvector(tf.matmul(x_, x_, transpose_b=True))
        v = tf.matmul(x_, u, transpose_a=True)
        v = _removenan(v / tf.linalg.norm(v, axis=1, keepdims=True))
    else:
        v = leading_eigenvector(tf.matmul(x_, x_, transpose_a=True))
        u = tf.matmul(x_, v)
        u = _removenan(u / tf.linalg.norm(u, axis=1, keepdims=True))
    u = tf.math.l2_normalize(u, axis=1)
    v = tf.math.l2_normalize(v, axis=1)
    return tf.cast(u, dtype), tf.cast(v, dtype)


def sign_of(v, axis=1):
    """The authors' sign convention ``sign(max v + min v)`` over ``axis`` (Distillation.py lines 38
    and 139), with ``+1`` where ``max + min == 0`` exactly (the authors' ``tf.sign`` gives 0 there
    and zeroes the vector; the README's convention is ``max + min >= 0``)."""
    m = tf.reduce_max(v, axis=axis, keepdims=True) + tf.reduce_min(v, axis=axis, keepdims=True)
    return tf.where(m >= 0, tf.ones_like(m), -tf.ones_like(m))


def first_pca(teacher_feat, near_square_grad="stop", grad="authors", differentiable=True):
    """EKI Teacher_PCA (lines 36-39): ``(U_T [B,HW,1], V_T [B,C,1])``, both multiplied by the
    per-sample sign that makes ``max_c V_T + min_c V_T >= 0``.

    ``differentiable=False`` (IEP's teacher, whose gradient is never taken): the leading vectors
    by :func:`leading_singular_vectors` instead of a full eigh; the same vectors to float
    rounding, and no gradient (``near_square_grad``/``grad`` do not apply)."""
    if differentiable:
        _, u, v = svd_eid(teacher_feat, 1, near_square_grad=near_square_grad, grad=grad)
    else:
        u, v = leading_singular_vectors(teacher_feat)
    sign = sign_of(v, axis=1)
    return u * sign, v * sign


def project_student(student_feat, u_t):
    """EKI Student_PCA (lines 46-47): ``V_S [B,C,1] = l2norm_C(F^T U_T)`` with ``F [B,HW,C]`` the
    student map and ``U_T`` the teacher's left singular vector (the student is not decomposed)."""
    f = _as_matrices(student_feat, "project_student")
    u_t = tf.convert_to_tensor(u_t)
    if u_t.shape.rank != 3 or u_t.shape[1] != f.shape[1]:
        raise ValueError(f"project_student: U_T must be [B,{f.shape[1]},n] to match the student's "
                         f"H*W={f.shape[1]}, got shape {u_t.shape}")
    return tf.math.l2_normalize(tf.matmul(f, tf.cast(u_t, f.dtype), transpose_a=True), axis=1)
