"""The Detector (AtPatch §3.3): per-column anomaly probabilities of one attention map.

Eq. 5: the map is averaged over heads. Eq. 6: ``σ(MLP(CNN(φ(A))))`` per column. Our CNN reads the
map's *column profile*: for every column, four statistics over the query rows (mean and max of
``a·N``, the attention relative to uniform, and of ``log(a / Q)``, relative to what clean inputs pay
that column, Eq. 10), and the same four minus their median over the map's columns, which tells a
column how it stands against the rest of *this* map. A 1x1 convolution and a per-column MLP give
one logit per column; every weight enters as ``|w|``.

Why profiles, not a 2-D CNN over the full ``Nq x N`` map: the first version ran a 2-D CNN (3x3,
16 channels) and then pooled over rows. On the digits ViT it cost +60 % (batch 1) and +111 %
(batch 64) over the eager forward, because the 3x3 conv and the row pooling of its 16-channel
output ran on every map. Pooling first leaves a few reductions per map. Trained on the same
debugging set (held out 20 %, τ = 0.1, one run each), the two detected about equally well
(strict F1 0.79 profile, 0.85 2-D) and both brought the real trigger's ASR to 0.

Why no neighbouring columns: the second version ran a kernel-3 convolution along the columns.
The inverted trigger the Detector trains on often sits on another token than the real one (digits:
token 12, the real trigger token 16 at the edge next to the zero padding; Fashion-MNIST: token 1),
and a kernel over neighbours learns that token's surroundings: over three build seeds on the
digits ViT it left ASR at 0.6 / 0 / 18.8 %, and Fashion-MNIST BadNets at 0.94. Without neighbours
and without the median-relative half, the Detector saw only absolute levels and flagged 16-31 % of
clean digits maps, costing up to 2.2 pt.

Why ``|w|``: the logit then never falls when a column's features rise, so a column that draws more
attention (against clean inputs, against the rest of its map) is never judged less anomalous. The
inverted trigger sets how strong the training positives are, and the real trigger may be stronger
or weaker. With signed weights the Detector learned the inverted trigger's strength as a band: on a
second digits ViT (zoo seed 1) the inverted trigger drew 18-21x in layer 1 and the real one 10x,
with a clearly anomalous profile that still scored far below τ, and ASR stayed 1.0 on all three
build seeds; with ``|w|`` it is 0.05. Current numbers: ``bench/results/atpatch_*.md``.

One Detector serves every layer: a learned layer embedding is added to the MLP's hidden layer.
A backdoor Detector has no per-token embedding either, for the same reason: a column is judged by
its attention, not its position. A fairness Detector has one (``token_embedding``): a protected
attribute is one fixed token of the tabular model and draws no excess attention (the issue's Adult
measurement: ≈ 1/15 of each row, bias row or not), so its identity is all there is to go by.
Without it, on Adult the Detector flagged other tokens on every row and masking them cost 12 pt of
accuracy while race UF rose from 4 % to 19 %. Row statistics accept any number of query rows (the
FT-Transformer's last layer has one). ``features`` is ``f_θ`` of Eq. 8; ``train_detector``
minimises Eq. 7 (BCE + λ·contrastive) with AdamW.

Hyper-parameters live in the manifest (``config()``), tensors in ``detector.safetensors``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DetectorError(ValueError):
    """A Detector that does not fit the model (layers, sequence length) or a malformed one."""


_EPS = 1e-4
DESIGN = "column-profile-monotone"
_PROFILE = 4  # statistics per column; the features are these and these minus the map's median


class Detector(nn.Module):
    def __init__(self, n_layers: int, seq_len: int, channels: int = 16, hidden: int = 32,
                 query_lens: list[int] | None = None, token_embedding: bool = False):
        super().__init__()
        self.n_layers, self.seq_len, self.channels, self.hidden = n_layers, seq_len, channels, hidden
        self.query_lens = list(query_lens or [seq_len] * n_layers)
        # log(1 / (Q + ε)) per layer: log(a / Q) is then one add on the hot path.
        for l, nq in enumerate(self.query_lens):
            self.register_buffer(f"log_inv_benign{l}", torch.zeros(nq, seq_len))
        self.conv = nn.Conv1d(2 * _PROFILE, channels, 1)
        self.mix = nn.Conv1d(channels, hidden, 1)
        self.layer_emb = nn.Parameter(torch.zeros(n_layers, hidden, 1))
        self.token_embedding = token_embedding
        # per-token term of the hidden layer; all zeros and frozen when the Detector is position-free
        self.token_emb = nn.Parameter(torch.zeros(hidden, seq_len), requires_grad=token_embedding)
        self.out = nn.Conv1d(hidden, 1, 1)
        # Start from the prior "almost every column is normal" (p ≈ 2 %), not p = 0.5, which at
        # τ = 0.1 would flag every column until training has pushed all of them down.
        nn.init.constant_(self.out.bias, -4.0)
        self._fast: dict | None = None
        self._sum_forms: dict[tuple[int, int, int], dict] = {}   # logits_from_heads' weights per map shape

    def set_benign(self, benign: list[torch.Tensor]) -> None:
        for l, q in enumerate(benign):
            getattr(self, f"log_inv_benign{l}").copy_(-torch.log(q + _EPS))

    def config(self) -> dict:
        return {"design": DESIGN, "n_layers": self.n_layers, "seq_len": self.seq_len,
                "channels": self.channels, "hidden": self.hidden, "query_lens": self.query_lens,
                "token_embedding": self.token_embedding}

    @classmethod
    def from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "Detector":
        if config.get("design") != DESIGN:
            raise DetectorError(f"detector design {config.get('design', '2-D map CNN')!r} is not "
                                f"{DESIGN!r}; rebuild it with `repair-proxy atpatch build`")
        try:
            det = cls(int(config["n_layers"]), int(config["seq_len"]), int(config["channels"]),
                      int(config["hidden"]), [int(q) for q in config["query_lens"]],
                      bool(config["token_embedding"]))
            det.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError, TypeError) as err:
            raise DetectorError(f"detector does not match its manifest config {config}: {err}") from err
        return det

    def profile(self, a: torch.Tensor, layer: int) -> torch.Tensor:
        """Head-averaged maps ``(B, Nq, N)`` → column features ``(B, 8, N)``: mean and max over
        rows of ``a·N`` and of ``log(a / Q)``, then the same minus their median over columns."""
        n = a.shape[-1]
        ratio = torch.log(a + _EPS) + getattr(self, f"log_inv_benign{layer}")
        prof = torch.stack([a.mean(1) * n, a.amax(1) * n, ratio.mean(1), ratio.amax(1)], 1)
        return torch.cat([prof, prof - prof.median(-1, keepdim=True).values], 1)

    def features(self, a: torch.Tensor, layer: int) -> torch.Tensor:
        """``f_θ``: head-averaged maps ``(B, Nq, N)`` → ``(B, hidden, N)``."""
        z = F.relu(F.conv1d(self.profile(a, layer), self.conv.weight.abs(), self.conv.bias))
        return F.relu(F.conv1d(z, self.mix.weight.abs(), self.mix.bias) + self.layer_emb[layer] + self.token_emb)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, hidden, N)`` features → logits ``(B, N)``."""
        return F.conv1d(features, self.out.weight.abs(), self.out.bias).squeeze(1)

    def forward(self, a: torch.Tensor, layer: int) -> torch.Tensor:
        """Eq. 6 before σ: logits ``(B, N)`` of head-averaged maps ``(B, Nq, N)``."""
        return self.head(self.features(a, layer))

    # -- the hot path ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Fold what the hot path reuses into plain matrices, channels last: ``|w|``, the ×N of
        the profile into the conv weights, the layer and token embeddings into a ``(N, hidden)``
        mix bias per layer. With ``W = [W_p, W_r]`` over (profile, profile − median),
        ``W·[p; p − m] = (W_p + W_r)·p − W_r·m``: the median is subtracted once per map, not once
        per column."""
        n = self.seq_len
        w = self.conv.weight.detach()[:, :, 0].abs()               # (C, 8)
        w[:, [0, 1, 4, 5]] *= n
        order = [0, 2, 1, 3]  # the hot path's profile order: means of (a, ratio), then maxima
        w_p, w_r = w[:, order], w[:, [4 + i for i in order]]
        self._fast = {"conv_w": (w_p + w_r).t().contiguous(), "median_w": w_r.t().contiguous(),
                      "conv_b": self.conv.bias.detach(),
                      "mix_w": self.mix.weight.detach()[:, :, 0].abs().t().contiguous(),
                      "mix_b": [(self.mix.bias + self.layer_emb[l, :, 0] + self.token_emb.t()).detach().contiguous()
                                for l in range(self.n_layers)],
                      "out_w": self.out.weight.detach()[0, :, 0].abs(), "out_b": self.out.bias.detach()}
        self._fast["mix_w_t"] = self._fast["mix_w"].t().contiguous()                 # (hidden, C)
        self._fast["mix_b_t"] = [m.t().contiguous() for m in self._fast["mix_b"]]    # (hidden, N)
        self._sum_forms = {}

    def logits_from_heads(self, attn: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits ``(B, N)`` from the per-head map ``(B, H, Nq, N)`` (after ``prepare``): the same
        function as ``forward(attn.mean(1))`` in as few CPU ops as we found (16). It reads the
        head *sum* ``s = H·a`` and row *sums*, and the 1/H and 1/Nq these leave in the features
        are folded into the weights (``_sum_form``); the profile stays channels first, so the
        convolutions are two batched products.

        On the CPU each op costs 2-3x more inside the forward than back to back (cold between
        the model's own ops), so the count of ops is what matters. Timed inside the digits ViT's
        forward (2 threads, AVX-512 EPYC): 68 → 56 µs at batch 1, 215 → 193 µs at batch 64
        against the earlier form (means, rows channels last, three products). Tried before and
        not kept: NumPy (no faster); torch.compile (slower, ``README.md``, AtPatch added
        latency); TorchScript (no faster, and its CPU fuser needs an LLVM backend the pinned
        torch lacks). What the CPU hot path now runs is the same arithmetic compiled as one C++
        function (``repair.atpatch.cpu_kernel``); this form stays the GPU's eager path and
        the CPU's where the kernel cannot be built."""
        b, heads, nq, n = attn.shape
        f, w = self._fast, self._sum_form(layer, heads, nq)
        s = attn.sum(1)                                                                # (B, Nq, N)
        # the log-ratio of Eq. 10 in one product: log((a + ε) / (Q + ε)) = log(s·q/H + ε·q)
        ratio = torch.addcmul(w["eps_q"], s, w["q_per_head"]).log_()
        both = torch.cat([s, ratio], -1)                                               # (B, Nq, 2N)
        prof = torch.cat([both.sum(1), both.amax(1)], 1).view(b, _PROFILE, n)          # (B, 4, N)
        # torch.median's (lower) median, which kthvalue computes in about half the time here
        median = prof.kthvalue((n + 1) // 2, -1).values                               # (B, 4)
        bias = torch.addmm(f["conv_b"], median, w["neg_median_w"])                    # (B, C)
        z = torch.baddbmm(bias.unsqueeze(-1), w["conv_w"].expand(b, -1, -1), prof).relu_()
        h = torch.baddbmm(f["mix_b_t"][layer], f["mix_w_t"].expand(b, -1, -1), z).relu_()
        return torch.matmul(f["out_w"], h).add_(f["out_b"])                           # (B, N)

    def _sum_form(self, layer: int, heads: int, nq: int) -> dict:
        """``logits_from_heads``' first-layer weights for maps of ``heads`` heads and ``nq`` rows,
        made once per (layer, heads, rows) with tensor ops only (no host-to-device copy, so also
        inside a CUDA graph capture). Its profile ``p'`` holds the sums ``H·Nq·mean(a)``,
        ``Nq·mean(r)``, ``H·max(a)``, ``max(r)``, i.e. ``p = scale·p'``; ``scale > 0`` keeps the
        columns' order, so the median scales alike and ``W·p − W_m·med(p) = (scale·W)·p' −
        (scale·W_m)·med(p')``."""
        key = (layer, heads, nq)
        w = self._sum_forms.get(key)
        if w is None:
            f = self._fast
            scale = (1 / (heads * nq), 1 / nq, 1 / heads, 1.0)
            conv_w = torch.stack([row * c for row, c in zip(f["conv_w"], scale)])      # (4, C)
            median_w = torch.stack([row * c for row, c in zip(f["median_w"], scale)])
            q = getattr(self, f"log_inv_benign{layer}").exp()                          # 1 / (Q + ε)
            w = {"conv_w": conv_w.t().contiguous(), "neg_median_w": (-median_w).contiguous(),
                 "q_per_head": q / heads, "eps_q": q * _EPS}
            self._sum_forms[key] = w
        return w

    def logits_fusable(self, attn: torch.Tensor, layer: int) -> torch.Tensor:
        """``logits_from_heads`` written for torch.compile on a GPU: the 4-, 16- and 32-wide
        products as broadcast sums and the median from a sort, so Inductor fuses all of it into
        its own eight kernels instead of calling cuBLAS and ``kthvalue``. Measured on an H100,
        graphed, digits ViT, the unpatched request over the graphed eager forward (batch 1 / 64):
        +9 / +13 % → +7 / +8 % (``bench/results/atpatch_latency_cuda.md``); flags and logits
        identical. Eager, on a CPU or GPU, ``logits_from_heads`` is faster (fewer, larger ops)."""
        f = self._fast
        prof = self._column_profile(attn, layer)                                       # (B, N, 4)
        n = prof.shape[1]
        median = prof.sort(1).values[:, (n - 1) // 2]                                  # (B, 4)
        shift = (median.unsqueeze(-1) * f["median_w"]).sum(-2)                         # (B, C)
        z = ((prof.unsqueeze(-1) * f["conv_w"]).sum(-2) + f["conv_b"] - shift.unsqueeze(1)).relu()
        h = ((z.unsqueeze(-1) * f["mix_w"]).sum(-2) + f["mix_b"][layer]).relu()       # (B, N, hidden)
        return (h * f["out_w"]).sum(-1) + f["out_b"]

    def _column_profile(self, attn: torch.Tensor, layer: int) -> torch.Tensor:
        """``(B, N, 4)``: per column of the head-averaged map (Eq. 5), the mean and maximum over
        rows of the attention and of its log-ratio to the benign map."""
        a = attn.mean(1)
        ratio = (a + _EPS).log_().add_(getattr(self, f"log_inv_benign{layer}"))
        both = torch.stack([a, ratio], -1)                                             # (B, Nq, N, 2)
        return torch.cat([both.mean(1), both.amax(1)], -1)

    def _apply(self, fn, *args, **kwargs):
        # Moving the module re-derives the folded weights on the new device.
        out = super()._apply(fn, *args, **kwargs)
        if self._fast is not None:
            self.prepare()
        return out


def logit_threshold(tau: float) -> float:
    """``σ(z) > τ`` ⇔ ``z > log(τ / (1 - τ))`` (Eq. 9 without computing σ on the hot path)."""
    if not 0 < tau < 1:
        raise DetectorError(f"threshold τ must be in (0, 1), got {tau}")
    return math.log(tau / (1 - tau))


def layer_logit_thresholds(threshold: float | list[float], n_layers: int) -> list[float]:
    """Eq. 9's τ as one logit per layer: ``threshold`` is one τ for every layer (the paper) or a
    list with one τ per layer (a calibrated build, ``offline.atpatch_build``)."""
    taus = [threshold] * n_layers if isinstance(threshold, (int, float)) else list(threshold)
    if len(taus) != n_layers:
        raise DetectorError(f"{len(taus)} per-layer thresholds for a model with {n_layers} attention layers")
    return [logit_threshold(float(t)) for t in taus]


def probability(logit: float) -> float:
    """``σ(z)``, kept below 1 so that it is still a valid τ."""
    return 1.0 / (1.0 + math.exp(-min(max(logit, -30.0), 30.0)))


def contrastive_loss(feats: torch.Tensor, labels: torch.Tensor, pos_index: torch.Tensor,
                     temperature: float = 0.5) -> torch.Tensor:
    """Eq. 8 as an InfoNCE term over columns: ``-log exp(s⁺)/(exp(s⁺) + Σ exp(s⁻))``, s = cosine.

    ``feats`` ``(M, d)``, ``labels`` ``(M,)`` (1 anomalous), ``pos_index`` ``(M,)``: each column's
    positive counterpart (same label: the same column of the paired map, or another anomalous
    column); negatives are all columns of the opposite label in the batch. The paper leaves the
    temperature open; 0.5 keeps cosine logits from being too flat.

    The labels are binary, so a normal column's negatives are the (few) anomalous columns and an
    anomalous column's are the normal ones: one ``normal x anomalous`` block of similarities holds
    both sides, not the full ``M x M`` matrix (measured: the digits Detector trains in 18-21 s,
    not 78-104 s).
    """
    anomalous = labels.bool()
    if anomalous.all() or not anomalous.any():  # one label only: no column has a negative
        return feats.new_zeros(())
    z = F.normalize(feats, dim=-1)
    pos = (z * z[pos_index]).sum(-1) / temperature                       # (M,)
    cross = z[~anomalous] @ z[anomalous].t() / temperature                # (normal, anomalous)
    lse_normal = torch.logsumexp(torch.cat([pos[~anomalous, None], cross], 1), 1)
    lse_anomalous = torch.logsumexp(torch.cat([pos[anomalous, None], cross.t()], 1), 1)
    return ((lse_normal - pos[~anomalous]).sum() + (lse_anomalous - pos[anomalous]).sum()) / len(labels)


def _positives(labels: torch.Tensor, partner: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each column's positive: its paired map's same column if that has the same label, else a
    random other column of the same label in the batch."""
    pos = partner.clone()
    bad = labels[partner] != labels
    for v in (0.0, 1.0):
        idx = (labels == v).nonzero().flatten()
        if len(idx) == 0:
            continue
        perm = idx[torch.randperm(len(idx), generator=g)]
        ring = torch.empty(len(labels), dtype=torch.long)
        ring[perm] = perm.roll(-1)
        sel = bad & (labels == v)
        pos[sel] = ring[sel]
    return pos


def train_detector(maps: list[torch.Tensor], labels: list[torch.Tensor], partner: torch.Tensor,
                   benign: list[torch.Tensor], epochs: int = 50, lr: float = 1e-3, lam: float = 1.0, batch_size: int = 32,
                   seed: int = 0, progress: bool = True, channels: int = 16,
                   hidden: int = 32, pos_weight: float | None = None,
                   token_embedding: bool = False) -> tuple[Detector, list[float]]:
    """Train on the Debugging Set's maps (Eq. 7-8). Per layer ``l``: ``maps[l]`` ``(M, Nq, N)``
    head-averaged, ``labels[l]`` ``(M, N)`` in {0, 1}; ``partner`` ``(M,)`` is each map's clean
    or defective counterpart (the same sample set at every layer). Returns the Detector in eval
    mode and the loss per epoch. The paper's defaults (§4.1.3) are AdamW, lr 1e-4, 50 epochs, λ = 1;
    we keep AdamW, 50 epochs and λ = 1 but use lr 1e-3 (measured: at 1e-4 the digits Detector had
    not left its prior after 30 epochs) and weight the rare anomalous columns in the BCE by
    ``pos_weight`` (default: sqrt(negatives / positives)), without which "never flag" is a good optimum.
    ``token_embedding``: a per-token term, for fairness Detectors (see the module docstring).
    """
    from tqdm import tqdm

    n_layers, m = len(maps), len(partner)
    # Seed before the weights are drawn: the initialisation otherwise depends on whatever used
    # the global generator earlier in the process, and the trained Detector with it.
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    det = Detector(n_layers, maps[0].shape[-1], channels, hidden, [m.shape[1] for m in maps], token_embedding)
    det.set_benign(benign)
    opt = torch.optim.AdamW(det.parameters(), lr=lr)
    # Batches are built from map *pairs* so each holds both sides of a delta.
    anchors = (partner >= torch.arange(m)).nonzero().flatten()
    if pos_weight is None:
        pos = sum(float(y.sum()) for y in labels)
        total_cols = sum(y.numel() for y in labels)
        pos_weight = ((total_cols - pos) / max(pos, 1.0)) ** 0.5
    pw = torch.tensor(pos_weight)
    history = []
    for _ in tqdm(range(epochs), desc="atpatch detector", disable=not progress):
        total, steps = 0.0, 0
        for layer in torch.randperm(n_layers, generator=g).tolist():
            order = anchors[torch.randperm(len(anchors), generator=g)]
            for i in range(0, len(order), batch_size):
                first = order[i:i + batch_size]
                idx = torch.cat([first, partner[first]])
                local = torch.empty(m, dtype=torch.long)
                local[idx] = torch.arange(len(idx))
                a, y = maps[layer][idx], labels[layer][idx]
                feats = det.features(a, layer)                       # (b, hidden, N)
                logits = det.head(feats)
                bce = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw)
                n = a.shape[-1]
                flat_y = y.flatten()
                col = torch.arange(n).repeat(len(idx))
                partner_flat = local[partner[idx]].repeat_interleave(n) * n + col
                pos = _positives(flat_y, partner_flat, g)
                flat_f = feats.transpose(1, 2).reshape(-1, feats.shape[1])
                loss = bce + lam * contrastive_loss(flat_f, flat_y, pos)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
        history.append(total / max(steps, 1))
    return det.eval(), history


@torch.no_grad()
def map_logits(det: Detector, maps: list[torch.Tensor], batch_size: int = 1024,
               layers: list[int] | None = None) -> list[torch.Tensor]:
    """Eq. 6 before σ: logits ``(M, N)`` for head-averaged maps ``(M, Nq, N)``, one entry per
    layer (``maps[i]`` is layer ``layers[i]``; default: every layer in order)."""
    layers = range(len(maps)) if layers is None else layers
    return [torch.cat([det(m[i:i + batch_size], l) for i in range(0, len(m), batch_size)])
            for l, m in zip(layers, maps)]


def flag_columns(logits: torch.Tensor, logit_threshold: float, top_margin: float | None = None) -> torch.Tensor:
    """Eq. 9 on logits ``(B, N)``: columns above τ. With ``top_margin`` (a backdoor build's
    choice, ``offline.atpatch_build``), only those also above their map's highest column's logit
    minus ``top_margin``: the trigger's column dominates its map, and columns far below it are
    ordinary ones that the Detector flags on clean maps as often. Eq. 9 alone flags them beside
    the trigger's (a strict §4.2.2 false negative, and Γ replaces them for nothing). Measured on
    the three digits builds (test maps, the real trigger's column as truth): FNR 0.26 / 0.040 /
    0.040 → 0.003 on each at a margin of 2 (gated builds 0.17-0.26 → 0.003); the trigger's column
    sat at least 2.4 logits above every other column in 99 % of triggered maps. FPR is unchanged:
    a map's top column is never dropped. Tensor ops only: the GPU hook uses it as it is."""
    if top_margin is None:
        return logits > logit_threshold
    return logits > (logits.amax(-1, keepdim=True) - top_margin).clamp_min(logit_threshold)


def detect_maps(det: Detector, maps: list[torch.Tensor], threshold: float | list[float],
                batch_size: int = 1024, layers: list[int] | None = None,
                top_margin: float | None = None) -> list[torch.Tensor]:
    """Flags ``(M, N)`` (Eq. 9, :func:`flag_columns`) of :func:`map_logits`. ``threshold``: one
    τ, or one per layer of the model (see :func:`layer_logit_thresholds`)."""
    z = layer_logit_thresholds(threshold, det.n_layers)
    layers = list(range(len(maps))) if layers is None else list(layers)
    return [flag_columns(logits, z[l], top_margin)
            for l, logits in zip(layers, map_logits(det, maps, batch_size, layers))]


def strict_metrics(flags: torch.Tensor, truth: torch.Tensor) -> dict:
    """§4.2.2, per map: a map with anomalous columns is a TP only if exactly those are flagged
    (anything else is an FN); a map without is a TN only if nothing is flagged (else an FP)."""
    flags, truth = flags.bool(), truth.bool()
    positive = truth.any(-1)
    exact = (flags == truth).all(-1)
    tp = int((positive & exact).sum())
    fn = int((positive & ~exact).sum())
    fp = int((~positive & flags.any(-1)).sum())
    tn = int((~positive & ~flags.any(-1)).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
            "fpr": round(fp / (fp + tn), 4) if fp + tn else 0.0,
            "fnr": round(fn / (tp + fn), 4) if tp + fn else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}
