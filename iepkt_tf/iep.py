"""The IEP distiller: the authors' ``EKI`` (Distillation.py lines 19-76) as one Keras layer.

For sensing points ``k = 0..L-1`` (the authors use three: ``feats[1:4]`` of each network) with
teacher channels ``C_k``:

* stacked PCA of the teacher map (:mod:`iepkt_tf.stacked_pca`, :mod:`iepkt_tf.plane_mapping`,
  :mod:`iepkt_tf.incremental_pca`): ``V_T``, plane mapping, second PCA ``P_k = (T_plane - M) V`` and
  its cosine graph ``G_k``; the student is projected on the teacher's ``U_T``, plane-mapped and
  projected with the teacher's ``M, V`` (lines 35-51);
* for every module ``i >= 1`` (points ``i-1 -> i``): an :class:`~iepkt_tf.mpnn.MPNN` with
  ``D = C_i//2`` and the MHGD :class:`~iepkt_tf.attention_heads.AttentionHeads` / :class:`~iepkt_tf.attention_heads.Estimator`
  (lines 53-70).

Two phases, as in the authors' training script:

* :meth:`IEPDistiller.module_losses` (initial phase, trains the module): the ``MHA_loss``
  collection, ``kld(G_i, R_train_i)`` and the estimator loss of each module. A step is "forward
  first, then every update from what the forward saw" (fixtures README): the teacher inference
  call that gives the estimator's extrinsic head runs before the training call that moves the
  MPNN statistics, and the PCA states are written after every read.
* :meth:`IEPDistiller.distill_losses` (main phase, module and PCA state frozen): the ``dist``
  collection, ``k_alt`` (message L1), ``k_int`` (``kld(R_T, R_S)``) and ``k_bb``
  (``kld(tanh G_S, tanh G_T)``), summed over modules.

Beyond the authors' code: a student whose channels differ from the teacher's at a point goes
through a learned 1x1 conv + batch-norm (+ ReLU by default) adapter
(``Distillation/Adapter{k}/{conv,bn}``, trained with the student; the authors assume equal channels, SPEC "Where the authors' code stops"), and
``pca="batch"`` selects the paper's plain per-batch PCA ablation.

Non-finite input feature maps or losses raise ``tf.errors.InvalidArgumentError`` naming the map or
the loss (``tf.debugging.assert_all_finite``), so a NaN never passes silently into training.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from iepkt_tf.incremental_pca import BatchPCA, IncrementalPCA, cosine_graph
from iepkt_tf.kld import kld_loss
from iepkt_tf.attention_heads import AttentionHeads, Estimator, est_loss, k_bb_term
from iepkt_tf.mpnn import MPNN, message_l1
from iepkt_tf.plane_mapping import plane_mapping
from iepkt_tf.stacked_pca import first_pca, project_student
from nets.layers import BatchNorm, Conv2D, collect_tf1_variables

PCA_KINDS = {"ipca": IncrementalPCA, "batch": BatchPCA}
# Student-side adapters (where the student's width differs from the teacher's): what follows the
# 1x1 conv + BN. The sensing points are post-ReLU maps, so "bn_relu" keeps the adapted student
# map where the teacher's lives; "bn" is the signed adapter of the first releases.
ADAPTERS = {"bn_relu": tf.nn.relu, "bn": tf.identity}


class IEPDistiller(keras.layers.Layer):
    """``IEPDistiller(teacher_channels, student_channels=None, mpnn_iter=2, num_head=8, pca="ipca",
    use_k_int=True, use_k_alt=True, use_k_bb=True)``.

    Args:
      teacher_channels: channel counts of the sensing points used (the authors: 3 points).
      student_channels: the student's counts at the same points (default: the teacher's); a point
        where they differ gets a 1x1 conv + BN adapter to the teacher's count.
      mpnn_iter: MPNN iterations (the authors' ``num_iter = 2``; the paper's ablation 1-4).
      num_head: MHGD heads including the extrinsic one (the authors' 8: 7 learned + 1).
      pca: ``"ipca"`` (incremental PCA, the authors') or ``"batch"`` (plain per-batch PCA ablation).
      use_k_int, use_k_alt, use_k_bb: which terms :meth:`distill_losses` computes; a switched-off
        term is omitted from its dict (and not computed). The module itself is always built and
        trained whole, as in the authors' code.
      adapter: ``"bn_relu"`` (1x1 conv + BN + ReLU: the adapted map is non-negative like the
        teacher's post-ReLU sensing point, so it lands in the teacher's PCA frame) or ``"bn"``
        (1x1 conv + BN, signed); see :data:`ADAPTERS`. Unused when the channels match.
    """

    def __init__(self, teacher_channels, student_channels=None, mpnn_iter=2, num_head=8, pca="ipca",
                 use_k_int=True, use_k_alt=True, use_k_bb=True, adapter="bn_relu", name="Distillation",
                 **kwargs):
        kwargs.setdefault("autocast", False)
        kwargs.setdefault("dtype", "float32")
        super().__init__(name=name, **kwargs)
        self.teacher_channels = [int(c) for c in teacher_channels]
        if len(self.teacher_channels) < 2 or min(self.teacher_channels) < 2:
            raise ValueError("IEPDistiller: teacher_channels must list at least 2 sensing points with "
                             f">= 2 channels each, got {list(teacher_channels)}")
        if student_channels is None:
            student_channels = self.teacher_channels
        self.student_channels = [int(c) for c in student_channels]
        if len(self.student_channels) != len(self.teacher_channels):
            raise ValueError(f"IEPDistiller: student_channels {self.student_channels} must have one entry "
                             f"per teacher point {self.teacher_channels}")
        if pca not in PCA_KINDS:
            raise ValueError(f"IEPDistiller: pca must be one of {sorted(PCA_KINDS)}, got {pca!r}")
        if adapter not in ADAPTERS:
            raise ValueError(f"IEPDistiller: adapter must be one of {sorted(ADAPTERS)}, got {adapter!r}")
        self.adapter = adapter
        if int(num_head) < 2:
            raise ValueError(f"IEPDistiller: num_head counts the extrinsic head too and must be >= 2, "
                             f"got {num_head}")
        self.mpnn_iter = int(mpnn_iter)
        self.num_head = int(num_head)
        self.pca_kind = pca
        self.use_k_int, self.use_k_alt, self.use_k_bb = bool(use_k_int), bool(use_k_alt), bool(use_k_bb)
        f32 = "float32"

        chans = self.teacher_channels
        self.pcas = [PCA_KINDS[pca](c, name=f"Stacked_PCA{k}", dtype=f32) for k, c in enumerate(chans)]
        self.mpnns, self.attentions, self.estimators = [], [], []
        for i in range(1, len(chans)):
            df, db = chans[i - 1] // 2, chans[i] // 2
            mpnn = MPNN(db, num_iter=self.mpnn_iter, name=f"EKI_module{i}_MPNN", dtype=f32)
            mpnn.build((None, db), (None, df))
            att = AttentionHeads((df + db) // 2, num_head=self.num_head - 1,
                                 name=f"EKI_module{i}_Attention", dtype=f32)
            att.build((None, db), (None, df))
            est = Estimator(db, num_head=self.num_head, name=f"EKI_module{i}_Estimator", dtype=f32)
            est.build((None, df))
            self.mpnns.append(mpnn)
            self.attentions.append(att)
            self.estimators.append(est)

        self.adapter_points, self.adapter_convs, self.adapter_bns = [], [], []
        for k, (ct, cs) in enumerate(zip(self.teacher_channels, self.student_channels)):
            if ct != cs:
                conv = Conv2D(ct, 1, name=f"Adapter{k}_conv", dtype=f32)
                conv.build((None, None, None, cs))
                bn = BatchNorm(name=f"Adapter{k}_bn", dtype=f32)
                bn.build((None, None, None, ct))
                self.adapter_points.append(k)
                self.adapter_convs.append(conv)
                self.adapter_bns.append(bn)
        self.built = True

    # ------------------------------------------------------------------ variables
    def tf1_variables(self):
        """``{bare TF1 name: variable}``; with equal channels exactly the authors' 73 names."""
        out = {}
        for k, pca in enumerate(self.pcas):
            out.update(collect_tf1_variables(
                {f"Stacked_PCA{k}/Teacher_PCA/PCA_Graph/{pca.tf1_scope}": pca}, "Distillation/EKI"))
            if k >= 1:
                mod = f"Distillation/EKI/EKI_module{k}"
                for rel, var in self.mpnns[k - 1].tf1_variables().items():
                    out[f"{mod}/MPNN/MPNN/{rel}"] = var
                for layer in (self.attentions[k - 1], self.estimators[k - 1]):
                    for rel, var in layer.tf1_variables().items():
                        out[f"{mod}/MHA/Attention_Knowledge/{rel}"] = var
        for k, conv, bn in zip(self.adapter_points, self.adapter_convs, self.adapter_bns):
            out.update(collect_tf1_variables({f"Adapter{k}/conv": conv, f"Adapter{k}/bn": bn},
                                             "Distillation"))
        return out

    def module_variables(self):
        """Trainable variables of the distillation module (phase 1), adapters excluded."""
        layers = self.mpnns + self.attentions + self.estimators
        return [v for layer in layers for v in layer.trainable_weights]

    def adapter_variables(self):
        """Trainable adapter variables (trained with the student in phase 2; empty if none)."""
        return [v for layer in self.adapter_convs + self.adapter_bns for v in layer.trainable_weights]

    def load_tf1_variables(self, arrays, strict=True):
        """Assign ``{bare TF1 name: array}`` (a fixture, or the authors' ``.mat`` restricted to
        ``Distillation/``) with :func:`iepkt_tf.mat_io.assign_params` (the project's one loader and
        shape rule); names that are not the distiller's are ignored. ``strict``: every variable
        must be present. Each PCA is marked initialised iff its loaded ``S`` is non-zero."""
        from iepkt_tf.mat_io import assign_params

        names = self.tf1_variables()
        mine = {n: a for n, a in arrays.items() if n in names}
        missing = [n for n in names if n not in mine]
        if strict and missing:
            raise ValueError(f"IEPDistiller.load_tf1_variables: {len(missing)} variables missing, "
                             f"first {missing[0]!r}")
        assign_params(names, mine, strict=False, what="IEPDistiller.load_tf1_variables")
        for pca in self.pcas:
            pca.initialized.assign(bool(tf.reduce_any(tf.not_equal(pca.S, 0.0))))

    # ------------------------------------------------------------------ shared pieces
    def _check_feats(self, feats, channels, who):
        if len(feats) != len(channels):
            raise ValueError(f"IEPDistiller: expected {len(channels)} {who} feature maps, got {len(feats)}")
        out = []
        for k, (f, c) in enumerate(zip(feats, channels)):
            f = tf.convert_to_tensor(f)
            if f.shape.rank != 4 or f.shape[-1] != c:
                raise ValueError(f"IEPDistiller: {who} feature map {k} must be [B,H,W,{c}], got {f.shape}")
            if f.shape[0] is not None and f.shape[0] < 2:
                raise ValueError(f"IEPDistiller: batch size must be >= 2 (batch graphs and batch norms "
                                 f"need two samples), got {f.shape[0]} in {who} feature map {k}")
            f = tf.cast(f, tf.float32)
            tf.debugging.assert_greater_equal(
                tf.shape(f)[0], 2, message=f"IEPDistiller: batch size must be >= 2 ({who} map {k})")
            # A sum is non-finite iff a term is (short of overflowing 3e38): one reduction instead
            # of CheckNumerics over the whole map (profiled at up to 20 ms of op time per map at
            # batch 128).
            total = tf.debugging.assert_all_finite(
                tf.reduce_sum(f), f"IEPDistiller: non-finite values in {who} feature map {k}")
            with tf.control_dependencies([total]):
                f = tf.identity(f)
            out.append(f)
        return out

    def _teacher_pca(self, teacher_feats):
        """Teacher_PCA per point (lines 36-43): ``U_T, V_T, T_plane`` and ``(G, P, mean, V)``."""
        pts = []
        for k, tfm in enumerate(teacher_feats):
            u_t, v_t = first_pca(tf.stop_gradient(tfm), differentiable=False)
            t_plane = plane_mapping(v_t[:, :, 0])
            p, mean, basis = self.pcas[k](t_plane)
            pts.append({"U_T": u_t, "V_T": v_t, "T_plane": t_plane, "P": p, "G": cosine_graph(p),
                        "mean": mean, "V": basis})
        return pts

    def _moving_stats(self):
        layers = self.mpnns + self.attentions + self.estimators
        return [v for layer in layers for v in layer.non_trainable_weights]

    @staticmethod
    def _finite(x, what):
        return tf.debugging.assert_all_finite(x, f"IEPDistiller: non-finite {what}")

    # ------------------------------------------------------------------ phase 1
    def module_losses(self, teacher_feats, noise=None, training=True, update_state=True, details=False):
        """The initial-phase forward (the ``MHA_loss`` collection).

        Args:
          teacher_feats: ``L`` teacher maps ``[B,H_k,W_k,C_k]``.
          noise: ``None`` (standard normal draws) or one ``[num_head,B,1]`` drop-head noise per
            module, in module order.
          training: BN with batch statistics (the authors' module-training calls).
          update_state: write the PCA states and (if ``training``) the BN moving statistics;
            every update is computed from what this forward pass saw.
          details: also return ``"mid"``, the intermediates under the fixtures' ``mid/`` names.

        Returns:
          ``{"mpnn_kld": [L-1], "est_loss": [L-1], "mha_loss": [2(L-1)] (the collection order
          m1 kld, m1 est, m2 kld, ...), "total": scalar (MHA_loss_sum)}``.
        """
        feats = self._check_feats(teacher_feats, self.teacher_channels, "teacher")
        n_mod = len(self.mpnns)
        if noise is not None and len(noise) != n_mod:
            raise ValueError(f"IEPDistiller.module_losses: noise must hold one [num_head,B,1] array per "
                             f"module ({n_mod}), got {len(noise)}")
        saved = None
        if training and not update_state:
            saved = [tf.identity(v.value) for v in self._moving_stats()]
        pts = self._teacher_pca(feats)
        mid = {}
        mpnn_kld, est_losses, mha = [], [], []
        for i in range(1, len(pts)):
            mpnn, att, est = self.mpnns[i - 1], self.attentions[i - 1], self.estimators[i - 1]
            t_b, t_f = pts[i]["P"], pts[i - 1]["P"]
            # The teacher inference call (line 62) reads the moving statistics before the
            # training call below updates them.
            _, m_t_infer, _ = mpnn(t_b, t_f, training=False)
            extrinsic = tf.reduce_mean(m_t_infer, axis=2) * float(self.mpnn_iter)        # line 69
            r_train, _, _ = mpnn(t_b, t_f, training=training)
            kl = kld_loss(pts[i]["G"], r_train)                                          # line 59
            heads = att(t_b, t_f, training=training)
            n_i = None
            if noise is not None:
                n_i = tf.convert_to_tensor(noise[i - 1], tf.float32)
                if n_i.shape.rank != 3 or n_i.shape[0] != self.num_head or n_i.shape[2] != 1:
                    raise ValueError(f"IEPDistiller.module_losses: noise[{i - 1}] must be "
                                     f"[{self.num_head},B,1], got {n_i.shape}")
            est_out = est(t_f, heads, extrinsic, n_i, training=training)
            e_loss = est_loss(t_b, est_out)                                              # line 167
            mpnn_kld.append(kl)
            est_losses.append(e_loss)
            mha += [kl, e_loss]
            if details:
                mid.update({f"m{i}/mpnn_train/R": r_train, f"m{i}/extrinsic": extrinsic,
                            f"m{i}/heads_train_T": heads, f"m{i}/est_out": est_out})
        if update_state:
            new_states = [pca.compute_update(p["T_plane"]) for pca, p in zip(self.pcas, pts)]
            for pca, new in zip(self.pcas, new_states):
                pca.assign_state(new)
        if saved is not None:
            for v, s in zip(self._moving_stats(), saved):
                v.assign(s)
        mha = tf.stack(mha)
        out = {"mpnn_kld": tf.stack(mpnn_kld), "est_loss": tf.stack(est_losses), "mha_loss": mha,
               "total": self._finite(tf.reduce_sum(mha), "module loss (MHA_loss_sum)")}
        if details:
            for k, p in enumerate(pts):
                for key in ("V_T", "U_T", "T_plane", "G", "P"):
                    mid[f"p{k}/{key}"] = p[key]
            out["mid"] = mid
        return out

    # ------------------------------------------------------------------ phase 2
    def adapt(self, student_feats, training=True):
        """The student maps after the adapters (identity where channels already match)."""
        out = list(student_feats)
        for k, conv, bn in zip(self.adapter_points, self.adapter_convs, self.adapter_bns):
            out[k] = ADAPTERS[self.adapter](bn(conv(out[k]), training=training))
        return out

    def distill_losses(self, student_feats, teacher_feats, training_adapter=True, details=False):
        """The main-phase distillation terms (the ``dist`` collection), module and PCA frozen.

        Returns ``{"k_alt", "k_int", "k_bb"}`` (scalars, summed over modules; switched-off terms
        omitted): ``k_alt = sum_i mean_vw sum_c |M_S - M_T|``, ``k_int = sum_i kld(R_T, R_S)``,
        ``k_bb = sum_i kld(tanh G_S, tanh G_T)``. Gradients reach ``student_feats`` (and the
        adapters). ``training_adapter``: adapter BN on batch statistics with moving update.
        ``details`` adds ``"mid"`` (fixture ``mid/`` names) and ``"terms"`` (per-module terms).
        """
        t_feats = self._check_feats(teacher_feats, self.teacher_channels, "teacher")
        s_feats = self._check_feats(student_feats, self.student_channels, "student")
        for k, (s, t) in enumerate(zip(s_feats, t_feats)):
            if s.shape[1:3] != t.shape[1:3]:
                raise ValueError(f"IEPDistiller: student map {k} has spatial size {s.shape[1:3]}, the "
                                 f"teacher's is {t.shape[1:3]}; they must match")
        s_feats = self.adapt(s_feats, training=training_adapter)
        pts = self._teacher_pca(t_feats)
        s_b = []
        mid = {}
        for k, (sfm, p) in enumerate(zip(s_feats, pts)):
            v_s = project_student(sfm, p["U_T"])                                          # line 47
            s_plane = plane_mapping(v_s[:, :, 0])
            s_b.append(tf.matmul(s_plane - p["mean"], p["V"]))                           # line 51
            if details:
                mid.update({f"p{k}/V_S": v_s, f"p{k}/S_plane": s_plane, f"p{k}/S_proj": s_b[-1]})
        use_mpnn = self.use_k_int or self.use_k_alt
        alt, inte, bb, terms = [], [], [], {}
        for i in range(1, len(pts)):
            t_b, t_f, sb, sf = pts[i]["P"], pts[i - 1]["P"], s_b[i], s_b[i - 1]
            if use_mpnn:
                r_t, m_t, _ = self.mpnns[i - 1](t_b, t_f, training=False)
                r_s, m_s, _ = self.mpnns[i - 1](sb, sf, training=False)
                alt.append(message_l1(m_s, m_t))                                         # line 65
                inte.append(kld_loss(r_t, r_s))                                          # line 66
                terms.update({f"module{i}/msg_l1": alt[-1], f"module{i}/graph_kld": inte[-1]})
                if details:
                    mid.update({f"m{i}/mpnn_infer_T/R": r_t, f"m{i}/mpnn_infer_T/M": m_t,
                                f"m{i}/mpnn_infer_S/R": r_s, f"m{i}/mpnn_infer_S/M": m_s})
            if self.use_k_bb:
                g_t = self.attentions[i - 1](t_b, t_f, training=False)
                g_s = self.attentions[i - 1](sb, sf, training=False)
                bb.append(k_bb_term(g_s, g_t))                                           # line 171
                terms[f"module{i}/att_kld"] = bb[-1]
                if details:
                    mid.update({f"m{i}/heads_infer_T": g_t, f"m{i}/heads_infer_S": g_s})
        out = {}
        if self.use_k_alt:
            out["k_alt"] = self._finite(tf.add_n(alt), "distillation loss k_alt")
        if self.use_k_int:
            out["k_int"] = self._finite(tf.add_n(inte), "distillation loss k_int")
        if self.use_k_bb:
            out["k_bb"] = self._finite(tf.add_n(bb), "distillation loss k_bb")
        if details:
            out["terms"] = terms
            out["mid"] = mid
        return out

    def call(self, student_feats, teacher_feats, training=False):
        """Same as :meth:`distill_losses` (adapter BN mode = ``training``)."""
        return self.distill_losses(student_feats, teacher_feats, training_adapter=training)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(teacher_channels=self.teacher_channels, student_channels=self.student_channels,
                   mpnn_iter=self.mpnn_iter, num_head=self.num_head, pca=self.pca_kind,
                   use_k_int=self.use_k_int, use_k_alt=self.use_k_alt, use_k_bb=self.use_k_bb,
                   adapter=self.adapter)
        return cfg

