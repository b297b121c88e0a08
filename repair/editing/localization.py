"""Attribution-guided layer localization (paper §5.1, Eq. 3; discrete form Eq. 20 with n = 2).

Integrated Gradients from the corrupt input ``x̃`` (baseline) to the clean input ``x`` for the
clean label's logit, at the output of *every* editable layer, in one Captum
``LayerIntegratedGradients`` pass over the list of layers (``riemann_right`` with ``n_steps=2``:
the paper's ``Σ_{α=1..n}`` at ``α/n``). Captum interpolates all listed layers' outputs together,
so the layers share out the prediction change: completeness holds over the list,
``Σ_l Σ_i M^l_i = f(x) − f(x̃)``, and we report its error (Captum's convergence delta, relative
to ``|f(x) − f(x̃)|``) with the result. Each map ``M^l`` (positions × out-channels) is remapped
into the editing direction, ``M^{*,l} = M^l (C⁻¹K*)ᵀ`` (``K*``: the corrupt keys at the same
positions), and scored by ``Ĝ_l = ‖M^{*,l}‖_F``; the suspect layer is ``argmax_l Ĝ_l``.

In the joint pass a layer whose every path to the logits runs through another listed layer
(``qkv``/``fc1`` before ``proj``/``fc2``, a BasicBlock's ``conv1`` before its ``conv2``) gets a
zero map: its share of the change is credited to the later layer. ``joint=False`` runs one
Captum pass per layer instead (Lemma 3's per-layer completeness, ``L`` times the cost); the
benchmark (``bench/rectify_localization.py``) compares the two against editing every layer.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from captum.attr import LayerIntegratedGradients
from torch import nn

from repair.editing.keystats import LayerStats
from repair.editing.layers import EditableLayer, capture_inputs_outputs


@dataclass
class Localization:
    scores: dict[str, float]      # Ĝ_l per layer
    ranking: list[str]            # layers by decreasing Ĝ_l
    completeness_error: float     # |Σ_l Σ_i M^l − (f(x) − f(x̃))| / |f(x) − f(x̃)|, mean over pairs

    def top(self, k: int = 1) -> list[str]:
        return self.ranking[:k]


def locate(model: nn.Module, layers: list[EditableLayer], stats: dict[str, LayerStats],
           clean: torch.Tensor, corrupt: torch.Tensor, labels: torch.Tensor,
           n_steps: int = 2, joint: bool = False) -> Localization:
    """Rank ``layers`` by ``Ĝ_l`` for the pairs ``(clean[i], corrupt[i])`` with labels ``labels[i]``."""
    if joint:
        maps, delta = _integrated_gradients(model, [layer.module for layer in layers], clean,
                                            corrupt, labels, n_steps)
    else:
        maps, deltas = zip(*(_integrated_gradients(model, [layer.module], clean, corrupt, labels,
                                                   n_steps) for layer in layers))
        maps = [m[0] for m in maps]
        delta = torch.stack(deltas).abs().mean(0)  # mean per-layer completeness error
    with torch.no_grad():
        with capture_inputs_outputs(layers) as rec:
            model(corrupt)
        logits_clean = model(clean).gather(1, labels[:, None]).squeeze(1)
        logits_corrupt = model(corrupt).gather(1, labels[:, None]).squeeze(1)
        change = (logits_clean - logits_corrupt).abs().clamp_min(1e-6)
        completeness = (delta.abs() / change).mean()
        scores = []
        for layer, m in zip(layers, maps):
            m = layer.positions(m).reshape(-1, layer.value_dim)            # (B·P, m)
            k = layer.keys(rec[layer.name][0]).reshape(-1, layer.key_dim)  # (B·P, n)
            ck = stats[layer.name].inverse(k.double()).to(m)               # rows C⁻¹k*
            scores.append(torch.linalg.matrix_norm(m.T @ ck))              # ‖M (C⁻¹K*)ᵀ‖_F
        scores = torch.stack(scores).cpu()                                 # one sync for all layers
    named = {layer.name: float(s) for layer, s in zip(layers, scores)}
    ranking = sorted(named, key=named.get, reverse=True)
    return Localization(named, ranking, float(completeness))


def _integrated_gradients(model, modules, clean, corrupt, labels, n_steps):
    """One Captum LayerIntegratedGradients pass over ``modules`` (Eq. 20, riemann_right, n steps)."""
    with warnings.catch_warnings():
        # Captum warns about layers that feed one another; in the joint pass that is the design
        # (a layer behind another gets a zero map: module docstring)
        warnings.filterwarnings("ignore", message="Multiple layers provided")
        lig = LayerIntegratedGradients(model, list(modules))
    maps, delta = lig.attribute(clean, baselines=corrupt, target=labels, n_steps=n_steps,
                                method="riemann_right", return_convergence_delta=True,
                                grad_kwargs={"allow_unused": True, "materialize_grads": True})
    return maps, delta
