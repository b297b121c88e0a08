"""AtPatch (papers/atpatch.md): detect over-attended columns and redistribute them at inference.

- ``debugging_set``: clean/defective pairs and column labels (§3.2), ``trigger_inversion`` (Eq. 3);
- ``detector``: the column Detector (Eq. 5-8); ``benign``: benign columns Q (Eq. 10);
- ``redistribution``: the hot patch Γ (Eq. 11) and its masked variant;
- ``runtime``: :class:`AtPatch`, the single-pass hooked forward the server uses.
"""
