"""``repair-proxy evaluate``: accuracy, ASR / UF of a version with AtPatch off or on, and with
``--patch on`` the Detector's strict map-level metrics (AtPatch §4.2.2), the two ablations of
§4.2.3 (a random 1-3 column selector instead of the Detector; no rescaling), for a known trigger
the method's ceiling (the real trigger's columns instead of the Detector: what a perfect Detector
would reach), the Detector's strict metrics as τ moves (the paper's Fig. 3 PR curve; PNG with
``--detector-curve``), and optional PNG heatmaps of attention maps before/after the patch.

The Detector is scored on held-out maps: test images whose real trigger works (ground truth: the
trigger's tokens in every layer the Detector runs on, over-attended there or not, the strictest
reading; ``trigger_excess_ratio`` gives how much more attention they draw per layer than without
the trigger) and as many clean test images (nothing may be flagged in any layer). The maps are
unpatched; ``bench/atpatch_served_flags.py`` scores the flags of the served forward instead.
"""
from __future__ import annotations

from pathlib import Path

import torch

from offline.datasets import ImageData, load_dataset
from offline.defects import Trigger
from repair.atpatch.debugging_set import excess_layers, patch_tokens
from repair.atpatch.detector import flag_columns, layer_logit_thresholds, map_logits, probability, strict_metrics
from repair.atpatch.runtime import AtPatch, PatchedModel, TargetClassGate
from repair.attention import attention_maps
from repair.bundle import Bundle
from repair.metrics import accuracy, attack_success_rate, predict, unfairness, worst_class_asr


class EvaluateError(ValueError):
    pass


def _trigger(version, defect, visibility, location) -> Trigger | None:
    if version.has("defect"):
        return Trigger.from_tensors(version.tensors("defect"))
    if defect in ("badnets", "blend"):
        from offline.zoo import make_trigger

        data_shape = tuple(version.manifest["preprocessing"][k] for k in ("channels", "height", "width"))
        return make_trigger(defect, data_shape, location=location, visibility=visibility)
    return None


def _random_selector(n_tokens: int, seed: int = 0):
    """w/o Det.: 1-3 random non-[CLS] columns per map (§4.2.3)."""
    g = torch.Generator().manual_seed(seed)

    def select(layer, attn):
        b = attn.shape[0]
        flags = torch.zeros(b, n_tokens, dtype=torch.bool)
        k = torch.randint(1, 4, (b,), generator=g)
        for i in range(b):
            flags[i, 1 + torch.randperm(n_tokens - 1, generator=g)[: int(k[i])]] = True
        return flags.to(attn.device)
    return select


def _columns_selector(n_tokens: int, tokens: list[int]):
    """A perfect Detector for a known trigger: its columns, on every input."""
    def select(layer, attn):
        flags = torch.zeros(attn.shape[0], n_tokens, dtype=torch.bool, device=attn.device)
        flags[:, tokens] = True
        return flags
    return select


def detector_test_inputs(model, x_clean, x_bad, y, target) -> tuple[torch.Tensor, torch.Tensor]:
    """The Detector's test inputs: ``works``, the triggered images on which the backdoor works
    (other classes answered with the target), and as many clean images (those it does not work on
    where there are enough, else the first ones)."""
    works = (predict(model, x_bad) == target) & (y != target)
    n = int(works.sum())
    return works, x_clean[~works][:n] if (~works).sum() >= n else x_clean[:n]


def detector_metrics(patch: AtPatch, model, x_clean, x_bad, y, target, mask, patch_size) -> dict:
    """Strict §4.2.2 metrics of the Detector on unpatched maps, one map per layer it runs on: a
    triggered input on which the backdoor works is an over-attention map whose anomalous columns
    are the real trigger's tokens; a clean input of the same count is a clean map. With the
    target gate also ``served``: the same on the flags that reach Γ, those of rows the bare model
    answers with the target (every triggered map here, as the backdoor works on it)."""
    works, xc = detector_test_inputs(model, x_clean, x_bad, y, target)
    xb = x_bad[works]
    maps_b, maps_c = attention_maps(model, xb), attention_maps(model, xc)
    tokens = patch_tokens(mask, patch_size)
    _, ratios = excess_layers(attention_maps(model, x_clean[works]), maps_b, tokens, 2.0)
    run, det = patch.layers, patch.detector
    z = layer_logit_thresholds(patch.threshold, det.n_layers)

    def margins(maps):
        """Each column's logit minus its layer's threshold (flagged where > 0, Eq. 9) and whether
        the build's top margin lets it be flagged at all (``flag_columns``)."""
        logits = map_logits(det, [maps[l] for l in run], layers=run)
        return ([g - z[l] for l, g in zip(run, logits)],
                [flag_columns(g, float("-inf"), patch.top_margin) for g in logits])

    (margins_b, eligible_b), (margins_c, eligible_c) = margins(maps_b), margins(maps_c)
    flags_b = [(m > 0) & e for m, e in zip(margins_b, eligible_b)]
    flags_c = [(m > 0) & e for m, e in zip(margins_c, eligible_c)]
    truth_b = torch.zeros(len(xb), maps_b[0].shape[-1], dtype=torch.bool)
    truth_b[:, tokens] = True
    flags = torch.cat(flags_b + flags_c)
    truth = torch.cat([truth_b] * len(run) + [torch.zeros_like(f) for f in flags_c])
    out = strict_metrics(flags, truth)
    out["curve"] = threshold_curve(torch.cat(margins_b + margins_c), truth, [z[l] for l in run],
                                   torch.cat(eligible_b + eligible_c))
    if isinstance(patch.gate, TargetClassGate):
        answered_target = (predict(model, xc) == patch.gate.target)[:, None]
        out["served"] = strict_metrics(torch.cat(flags_b + [f & answered_target for f in flags_c]), truth)
    out.update(maps_triggered=len(xb) * len(run), maps_clean=len(xc) * len(run), trigger_tokens=tokens,
               detector_layers=run, trigger_excess_ratio=[round(r, 2) for r in ratios])
    return out


# The issue's Detector targets: FPR ≤ 0.10 and FNR ≤ 0.01 (the paper's Table 4: FPR ≤ 0.099).
FPR_BOUND = 0.10


def threshold_curve(margins: torch.Tensor, truth: torch.Tensor, logit_thresholds: list[float],
                    eligible: torch.Tensor | None = None, points: int = 101) -> dict:
    """The strict metrics as every layer's logit threshold moves by one shift ``s`` (the paper's
    Fig. 3 PR curve, and the FPR/FNR it trades). ``margins``: ``(M, N)`` logits minus the served
    thresholds ``logit_thresholds`` (one per layer the Detector runs on), so ``s = 0`` is the
    served operating point (``served``). ``best_fnr_at_fpr``: the lowest FNR of any shift at
    FPR ≤ 0.10. It is picked with the real trigger's truth, so it shows what the Detector's scores
    allow, not a threshold a build could choose: a build knows only its inverted trigger.
    ``eligible``: the columns the build's top margin lets be flagged (``flag_columns``; it moves
    with no τ)."""

    def point(s: float) -> dict:
        m = strict_metrics((margins > s) if eligible is None else (margins > s) & eligible, truth)
        return {"shift": round(s, 3), "thresholds": [round(probability(z + s), 4) for z in logit_thresholds],
                **{k: m[k] for k in ("precision", "recall", "fpr", "fnr")}}

    lo, hi = float(margins.min()), float(margins.max())
    shifts = sorted(torch.linspace(lo - 1e-3, hi + 1e-3, points).tolist() + [0.0])
    curve = [point(s) for s in shifts]
    served = curve[shifts.index(0.0)]
    within = [c for c in curve if c["fpr"] <= FPR_BOUND]
    return {"points": curve, "served": served,
            "best_fnr_at_fpr": {"fpr_at_most": FPR_BOUND, **min(within, key=lambda c: (c["fnr"], c["fpr"]))}}


def plot_detector_curves(curves: dict[str, dict], path: Path, title: str) -> Path:
    """PNG of ``{label: threshold_curve(...)}``: strict precision against recall (the paper's
    Fig. 3) and FNR against FPR with the issue's target corner shaded; the served operating
    point (shift 0) of every curve marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (pr, rates) = plt.subplots(1, 2, figsize=(10, 4.2))
    rates.fill_between([0, FPR_BOUND], 0, 0.01, color="tab:green", alpha=0.3, label="target: FPR ≤ 0.10, FNR ≤ 0.01")
    for label, curve in curves.items():
        pts = [c for c in curve["points"] if c["recall"] > 0]
        served = curve["served"]
        line, = pr.plot([c["recall"] for c in pts], [c["precision"] for c in pts], label=label)
        pr.plot(served["recall"], served["precision"], "o", color=line.get_color())
        rates.plot([c["fpr"] for c in curve["points"]], [c["fnr"] for c in curve["points"]], color=line.get_color(),
                   label=label)
        rates.plot(served["fpr"], served["fnr"], "o", color=line.get_color())
    pr.set(xlabel="recall (strict)", ylabel="precision (strict)", xlim=(0, 1.02), ylim=(0, 1.02),
           title="precision-recall (dots: served τ)")
    rates.set(xlabel="FPR (clean maps flagged)", ylabel="FNR (triggered maps not exactly the trigger)",
              xlim=(0, 1.02), ylim=(0, 1.02), title="error rates as τ moves (linear below 0.01)")
    rates.set_xscale("symlog", linthresh=0.01)   # the targets live near 0: give them room
    rates.set_yscale("symlog", linthresh=0.01)
    pr.legend(fontsize=8, loc="lower left")
    rates.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_heatmaps(patch: AtPatch, x: torch.Tensor, out: Path, prefix: str) -> list[str]:
    """One PNG per sample: head-averaged map of every layer before (top) and after (bottom) the
    patch; layers the Detector does not run on show the same map twice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    seen: dict[int, tuple] = {}
    patch.observe(x, lambda l, before, after: seen.__setitem__(l, (before.mean(1).cpu(), after.mean(1).cpu())))
    n_layers = patch.access.n_layers
    files = []
    for i in range(len(x)):
        fig, axes = plt.subplots(2, n_layers, figsize=(3 * n_layers, 6), squeeze=False)
        for l in range(n_layers):
            before, after = (seen[l][0][i], seen[l][1][i]) if l in seen else (None, None)
            for row, (mat, title) in enumerate(((before, "before"), (after, "after"))):
                ax = axes[row][l]
                if mat is not None:
                    ax.imshow(mat.numpy(), cmap="viridis", vmin=0, aspect="auto")
                ax.set_title(f"layer {l} {title}", fontsize=9)
                ax.set_xlabel("key token")
                ax.set_ylabel("query token")
        fig.tight_layout()
        path = out / f"{prefix}-{i}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        files.append(str(path))
    return files


def evaluate_bundle(bundle, version=None, patch="off", defect="none", target_class=0,
                    visibility=0.5, location="br", heatmaps=None, ablations: bool = True,
                    detector_curve=None) -> dict:
    """``heatmaps``: a folder for PNG attention maps before/after the patch; ``detector_curve``:
    a PNG path for the Detector's curve (:func:`plot_detector_curves`). Both for a vision version
    with ``--patch on`` and a trigger to measure."""
    if patch not in ("on", "off"):
        raise EvaluateError(f"--patch must be on or off, got {patch!r}")
    if (heatmaps or detector_curve) and patch != "on":
        raise EvaluateError("--heatmaps and --detector-curve show the patch: they need --patch on")
    v = Bundle(bundle).version(version)
    model = v.build_model("cpu")
    data = load_dataset(v.manifest["dataset"]["name"])
    if detector_curve and not (isinstance(data, ImageData) and _trigger(v, defect, visibility, location)):
        raise EvaluateError(f"--detector-curve scores the Detector on triggered images: version {v.id} is not a "
                            "vision model with a trigger recorded or given (--defect badnets|blend)")
    if patch == "on" and not AtPatch.available(v):
        raise EvaluateError(f"version {v.id} has no AtPatch detector; run `repair-proxy atpatch build` first")
    atp = AtPatch.from_version(v, model) if patch == "on" else None
    net = PatchedModel(atp, "on") if atp is not None else model
    result = {"version": v.id, "patch": patch, "accuracy": round(accuracy(net, data.x_test, data.y_test), 4)}
    try:
        if isinstance(data, ImageData):
            _vision(result, v, model, atp, net, data, defect, target_class, visibility, location,
                    heatmaps, ablations, detector_curve)
        else:
            _tabular(result, v, model, atp, net, data, ablations)
    finally:
        if atp is not None:
            atp.remove()
    return result


def _vision(result, v, model, atp, net, data, defect, target_class, visibility, location, heatmaps,
            ablations, detector_curve):
    trig = _trigger(v, defect, visibility, location)
    if trig is None:
        return
    target = int(v.manifest.get("defect", {}).get("target_class", target_class))
    x_bad = trig.apply(data.x_test)
    result["asr"] = round(attack_success_rate(net, x_bad, data.y_test, target), 4)
    # A repair gives the triggered images their labels back; one that only moves the trigger's
    # answer to another class keeps ASR low and the backdoor (repair.metrics).
    result["triggered_accuracy"] = round(accuracy(net, x_bad, data.y_test), 4)
    worst, worst_class = worst_class_asr(net, x_bad, data.y_test)
    result["asr_worst_class"] = {"asr": round(worst, 4), "class": worst_class}
    # Clean images of the other classes that the model answers with the target anyway: the ASR
    # that a defence removing the trigger perfectly would still measure (Fashion-MNIST: 2.3 %).
    result["clean_to_target"] = round(attack_success_rate(net, data.x_test, data.y_test, target), 4)
    if atp is None:
        return
    result["patch_rate"] = {"clean": round(atp(data.x_test).patched.float().mean().item(), 4),
                            "triggered": round(atp(x_bad).patched.float().mean().item(), 4)}
    patch_size = int(v.manifest["architecture"].get("patch_size", 4))
    with atp.bare():
        result["detector"] = detector_metrics(atp, model, data.x_test, x_bad, data.y_test, target,
                                              trig.mask, patch_size)
    if detector_curve:
        result["detector_curve"] = str(plot_detector_curves(
            {v.id: result["detector"]["curve"]}, detector_curve, f"Detector of {v.id}, test maps (strict, §4.2.2)"))
    if ablations:
        tokens = patch_tokens(trig.mask, patch_size)
        result["ablations"] = _ablations(atp, data.x_test, data.y_test, x_bad, target, true_tokens=tokens)
    if heatmaps:
        keep = (data.y_test != target).nonzero().flatten()[:3]
        result["heatmaps"] = (save_heatmaps(atp, x_bad[keep], Path(heatmaps), "triggered")
                              + save_heatmaps(atp, data.x_test[keep], Path(heatmaps), "clean"))


def _ablations(atp: AtPatch, x, y, x_bad=None, target=None, protected: dict | None = None,
               true_tokens: list[int] | None = None) -> dict:
    """The paper's two ablations, each measured once: accuracy, ASR (backdoor), UF (fairness);
    with ``true_tokens`` also ``true_columns``, those columns patched on every input."""
    out = {}
    changes = [("without_detector", {"selector": _random_selector(atp.access.seq_len)}),
               ("without_rescaling", {"rescale": False})]
    if true_tokens:
        changes.append(("true_columns", {"selector": _columns_selector(atp.access.seq_len, true_tokens)}))
    for name, change in changes:
        saved = atp.selector, atp.rescale
        atp.selector = change.get("selector", atp.selector)
        atp.rescale = change.get("rescale", atp.rescale)
        try:
            net = PatchedModel(atp)
            out[name] = {"accuracy": round(accuracy(net, x, y), 4)}
            if x_bad is not None:
                out[name]["asr"] = round(attack_success_rate(net, x_bad, y, target), 4)
            if protected:
                out[name]["uf"] = {n: round(unfairness(net, x, p["column"], p["values"]), 4)
                                   for n, p in protected.items()}
        finally:
            atp.selector, atp.rescale = saved
    return out


def _tabular(result, v, model, atp, net, data, ablations):
    meta = v.manifest.get("atpatch", {})
    protected = meta.get("protected") or {}
    if not protected:
        schema = data.schema
        protected = {n: {"column": schema.index(n),
                         "values": [float(i) for i in range(len(schema.feature(n).categories))]}
                     for n in schema.protected if schema.feature(n).kind == "categorical"}
    result["uf"] = {n: round(unfairness(net, data.x_test, p["column"], p["values"]), 4)
                    for n, p in protected.items()}
    if atp is not None:
        result["patch_rate"] = {"test": round(atp(data.x_test).patched.float().mean().item(), 4)}
        if ablations:
            result["ablations"] = _ablations(atp, data.x_test, data.y_test, protected=protected)
