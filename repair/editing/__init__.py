"""Attribution-guided rank-one rectification (papers/rectification-rank-one.md).

- :mod:`layers`: editable layers as linear associative memories (§3, keys/values per position);
- :mod:`keystats`: second-moment statistics ``C = K Kᵀ`` and whitening (§3, appendix §9);
- :mod:`rank_one`: the rank-one edit ``W' = W + Λ (C⁻¹k*)ᵀ`` (Eq. 1, §4.1);
- :mod:`localization`: attribution-guided layer localization ``Ĝ_l`` (§5.1, Eq. 3 / Eq. 20);
- :mod:`dynamic`: dynamic rectification (Algorithm 1) and the static variant.
"""
