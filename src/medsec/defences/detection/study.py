"""Study entries for the detection defences: ``ma-kd-bu``, ``ma-lid``, ``ma-deepfeat``,
``li-zhu-mgm`` (family "detection").

Per detector and eps in {1, 2, 4}/255 (the profile's eps values that match):
1. fit on the victim's clean training features; supervised detectors also on adversarial
   examples of held-out training images (the last ``N_FIT``; a quarter each from FGSM, BIM,
   PGD-20 and CW-L-inf at that eps, run to the end as in the papers) - one detector per eps;
   the threshold is then fixed at 5% false positives on clean validation images;
2. non-adaptive rows: FGSM, BIM, PGD-20, CW-L-inf on the victim alone (run to the end, no
   early stop, as the papers did; the same images serve all four detectors);
3. adaptive rows: per example the worst case of the plain attacks (lambda = 0) and the
   lambda-ladder attack of ``adaptive.py`` with the detector in the success criterion.
Metrics: joint ASR (misclassified AND not flagged, over the n attacked images),
``detection_auc`` (clean attacked images vs their adversarial versions that fool the
victim), ``tpr_at_5fpr`` (share of those flagged at the fixed threshold), ``clean_fpr``
(clean attacked test images flagged).
"""

from __future__ import annotations

import copy
import io
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medsec.attacks import AttackSpec, Criterion, LossTerm, preset, run_attack
from medsec.defences import register_defence
from medsec.defences.detection.adaptive import (
    ADAPTIVE_STEPS,
    AIM_QUANTILE,
    HINGE_SLACK,
    KAPPA,
    LAMBDAS,
    Hinge,
    LayerGMMs,
    Surrogate,
    detector_hinge,
    gmm_matching,
    lambda_ladder_attack,
    surrogate_hinge,
)
from medsec.defences.detection.base import CharacteristicDetector, Detector, FlagAll
from medsec.defences.detection.deepfeat import DeepFeatureDetector
from medsec.defences.detection.kd_bu import KDBUDetector
from medsec.defences.detection.lid import LIDDetector
from medsec.defences.detection.mgm import GaussianDetector
from medsec.errors import MedsecError
from medsec.evaluation.context import StudyContext, make_row
from medsec.evaluation.figures import save as save_figure
from medsec.evaluation.figures import show_image
from medsec.models.training import predict_proba
from medsec.utils import atomic_write_bytes

FAMILY = "detection"
ATTACKS = ("fgsm", "bim", "pgd-20", "cw-linf")
EPS_255 = (1.0, 2.0, 4.0)
N_FIT = 1000  # held-out training images (clean + adversarial) that fit supervised detectors
TARGET_ASR = 0.9


ASSUMED = {
    "ma-kd-bu": "KD: per-class Gaussian KDE of penultimate training features, bandwidth 1.0, "
    "log-density under the predicted class; BU: 50 MC-dropout passes of the head (the only "
    "dropout), masks re-seeded per call when deployed, fresh for the attacker (EOT).",
    "ma-lid": "(assumed) the minibatch of 100 clean neighbours is a fixed random sample of "
    "training images; LID (k = 20) of every named layer and the logits.",
    "ma-deepfeat": "random forest (30 trees) on penultimate features; the attacker uses an "
    "MLP surrogate trained on the same features plus per-layer GMM feature matching.",
    "li-zhu-mgm": "(assumed) per-class Ledoit-Wolf Gaussians of channel-mean stage features "
    "and the penultimate layer; score = mean over layers of standardised squared Mahalanobis "
    "distance to the predicted class; clean training data only.",
}
COMMON_NOTE = (
    "Detection study: supervised detectors are fitted per eps on the last "
    f"{N_FIT} training images (clean) and their adversarial versions (a quarter each from "
    "FGSM, BIM, PGD-20, CW-L-inf at that eps, no early stop); densities/references use the "
    "other training images; every threshold is fixed at 5% FPR on clean validation images. "
    "Non-adaptive attacks run to the end (as in the papers). Adaptive = per example the "
    "plain attacks' joint successes (lambda 0), then targeted margin(kappa) + lambda x "
    "detector terms for lambda in the ladder. The attacker aims each detector score below "
    f"the {AIM_QUANTILE:.0%} quantile of clean validation scores (a typical clean image), "
    "not just under the deployed threshold; reported success is judged at the deployed "
    "threshold; detection AUC = clean attacked images vs adversarial images that fool the victim."
)


@dataclass
class Built:
    """A fitted detector at its fixed threshold plus the adaptive attacker's loss terms."""

    detector: Detector
    info: dict[str, Any]
    terms: list[tuple[float, LossTerm]]
    terms_desc: str
    aim: float = float("nan")  # the attacker's criterion: score below this (set by build)
    # Ma et al.'s protocol: a detector refitted on ONE attack's quarter of the fit set
    per_attack: Callable[[int], Detector] | None = None


def _eps_values(ctx: StudyContext) -> list[float]:
    eps = [e for e in ctx.profile.eps if round(e * 255, 3) in EPS_255]
    if not eps:
        raise MedsecError(f"profile {ctx.profile.name} has none of eps {EPS_255}/255")
    return eps


def _e(eps: float) -> str:
    return f"{eps * 255:g}"


def _tag(ctx: StudyContext) -> str:
    """Artefact folder unique to data and victim (a changed victim never reuses images)."""
    return f"detection/{ctx.data.content_hash[:10]}-{ctx.victim_meta.get('sha256', '')[:10]}"


def _cached_tensors(ctx: StudyContext, name: str, make: Callable[[], dict[str, Tensor]]) -> dict:
    path = ctx.artifact(f"{_tag(ctx)}/{name}.pt")
    if path.exists():
        return torch.load(path, weights_only=True)
    blob = make()
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())
    return blob


def _split_train(ctx: StudyContext) -> tuple[Tensor, Tensor, Tensor]:
    """(reference images, their labels, fit images): fit images never enter a density."""
    x = torch.from_numpy(ctx.data.train.images)
    y = torch.from_numpy(ctx.data.train.labels)
    n_fit = min(N_FIT, len(x) // 4)
    return x[:-n_fit], y[:-n_fit], x[-n_fit:]


def _fit_adversarial(ctx: StudyContext, eps: float) -> tuple[Tensor, Tensor]:
    """Clean fit images and their adversarial versions (quarters: FGSM, BIM, PGD, CW)."""
    _, _, x_fit = _split_train(ctx)
    y_fit = torch.from_numpy(ctx.data.train.labels)[-len(x_fit) :]

    def make() -> dict[str, Tensor]:
        parts = []
        for i, chunk in enumerate(torch.arange(len(x_fit)).chunk(len(ATTACKS))):
            spec = preset(ATTACKS[i], eps, early_stop=False)
            res = run_attack(
                ctx.victim,
                x_fit[chunk],
                y_fit[chunk],
                spec,
                batch_size=ctx.profile.batch_size,
                seed=ctx.seed + i,
            )
            parts.append(res.x_adv)
        return {"x_adv": torch.cat(parts)}

    return x_fit, _cached_tensors(ctx, f"fit-adv-eps{_e(eps)}", make)["x_adv"]


def _nonadaptive(ctx: StudyContext, attack: str, eps: float) -> tuple[Tensor, AttackSpec, float]:
    """The victim-only attack (shared by every detector), saved for the signature gate."""
    x, y, idx = ctx.attack_set(ctx.victim)
    spec = preset(attack, eps, early_stop=False)

    def make() -> dict[str, Tensor]:
        res = run_attack(ctx.victim, x, y, spec, batch_size=ctx.profile.batch_size, seed=ctx.seed)
        ctx.save_adversarial(f"detection-{attack}-eps{_e(eps)}", res.x_adv, idx, res.success)
        return {"x_adv": res.x_adv, "seconds": torch.tensor(res.seconds)}

    blob = _cached_tensors(ctx, f"nonadaptive-{attack}-eps{_e(eps)}", make)
    return blob["x_adv"], spec, float(blob["seconds"])


def _best_plain(ctx: StudyContext, det: Detector, y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per example, the first plain (non-adaptive) attack image that is a joint success."""
    best, done = None, torch.zeros(len(y), dtype=torch.bool)
    for attack in ATTACKS:
        x_adv = _nonadaptive(ctx, attack, eps)[0]
        best = x_adv.clone() if best is None else best
        ok = Criterion(ctx.victim, y.to(ctx.device), detector=det)(x_adv.to(ctx.device)).cpu()
        new = ok & ~done
        best[new], done = x_adv[new], done | ok
    assert best is not None
    return best, done


def _hinge(det: Detector, x_val: Tensor) -> Hinge:
    return Hinge.from_clean(det.score(x_val).numpy())


def _gmms(ctx: StudyContext, det: Detector, layers: tuple[str, ...]) -> LayerGMMs:
    x_ref, y_ref, _ = _split_train(ctx)
    _, feats = det.extract(x_ref)
    return LayerGMMs(layers).fit(feats, y_ref, seed=ctx.seed)


def build(ctx: StudyContext, name: str, eps: float) -> Built:
    """Fit detector ``name`` for ``eps``, fix its threshold, build the attacker's terms and
    its aim (the ``AIM_QUANTILE`` of the detector's clean validation scores)."""
    built = _build(ctx, name, eps)
    clean_val = built.detector.score(torch.from_numpy(ctx.data.val.images)).numpy()
    built.aim = float(np.quantile(clean_val, AIM_QUANTILE))
    return built


def _build(ctx: StudyContext, name: str, eps: float) -> Built:
    x_ref, y_ref, _ = _split_train(ctx)
    x_val = torch.from_numpy(ctx.data.val.images)
    victim = ctx.victim
    if name == "li-zhu-mgm":
        det: Detector = GaussianDetector(victim)
        info = det.fit(
            torch.from_numpy(ctx.data.train.images), torch.from_numpy(ctx.data.train.labels)
        )
        det.set_threshold(x_val)
        return Built(
            det,
            info,
            [(1.0, detector_hinge(det, _hinge(det, x_val)))],
            "Gaussian NLL of every monitored layer (target class), hinged",
        )
    clean, adv = _fit_adversarial(ctx, eps)
    if name == "ma-kd-bu":
        kd = KDBUDetector(victim)
        kd.fit_density(x_ref, y_ref)
        c_clean, c_adv = kd.characteristics_of(clean), kd.characteristics_of(adv)
        info = kd.fit_head(c_clean, c_adv)
        kd.set_threshold(x_val)
        return Built(
            kd,
            info,
            [(1.0, detector_hinge(kd, _hinge(kd, x_val)))],
            "LR(target-class KD, BU over 50 fresh dropout masks per step = EOT), hinged",
            per_attack=_per_attack(kd, CharacteristicDetector.fit_head, c_clean, c_adv),
        )
    if name == "ma-lid":
        lid = LIDDetector(victim)
        lid.fit_reference(x_ref, ctx.seed)
        c_clean, c_adv = lid.characteristics_of(clean), lid.characteristics_of(adv)
        info = lid.fit_head(c_clean, c_adv)
        lid.set_threshold(x_val)
        gmms = _gmms(ctx, lid, tuple(victim.feature_names))
        return Built(
            lid,
            info,
            [(1.0, detector_hinge(lid, _hinge(lid, x_val))), (1.0, gmm_matching(gmms))],
            "LR(batch-LID of every layer) differentiated directly + per-layer GMM "
            "feature matching (HFC), both hinged",
            per_attack=_per_attack(lid, CharacteristicDetector.fit_head, c_clean, c_adv),
        )
    if name == "ma-deepfeat":
        rf = DeepFeatureDetector(victim, seed=ctx.seed)
        info = rf.fit(clean, adv)
        rf.set_threshold(x_val)
        sur = Surrogate(128)
        f_clean = rf.extract(clean)[1]["penultimate"]
        f_adv = rf.extract(adv)[1]["penultimate"]
        info["surrogate_train_accuracy"] = sur.fit(f_clean, f_adv, seed=ctx.seed)
        with torch.no_grad():
            s_val = sur.score(rf.extract(x_val)[1]).numpy()
        sur.to(ctx.device)  # the attacker's features live there
        gmms = _gmms(ctx, rf, tuple(victim.feature_names))
        return Built(
            rf,
            info,
            [
                (1.0, surrogate_hinge(sur, Hinge.from_clean(s_val))),
                (1.0, gmm_matching(gmms)),
            ],
            "MLP surrogate of the forest (same features) + per-layer GMM feature "
            "matching (HFC), both hinged",
            per_attack=_per_attack(rf, DeepFeatureDetector.fit, clean, adv),
        )
    raise MedsecError(f"unknown detector {name!r}")


def _quarter(i: int, n: int) -> Tensor:
    """Indices of the fit set's quarter attacked by ``ATTACKS[i]`` (see _fit_adversarial)."""
    return torch.arange(n).chunk(len(ATTACKS))[i]


def _per_attack(
    det: Detector, fit: Callable[[Any, Tensor, Tensor], Any], clean: Tensor, adv: Tensor
) -> Callable[[int], Detector]:
    """Attack index -> a shallow copy of ``det`` refitted by ``fit(copy, clean, adv)`` on that
    attack's quarter of the fit set only (the deployed detector is untouched)."""

    def refit(i: int) -> Detector:
        q = _quarter(i, len(clean))
        other = copy.copy(det)
        fit(other, clean[q], adv[q])
        return other

    return refit


def _auc(s_clean: np.ndarray, s_adv: np.ndarray) -> float | None:
    """ROC-AUC of clean (0) vs adversarial (1) scores; None without adversarial images."""
    from sklearn.metrics import roc_auc_score

    if len(s_adv) == 0:
        return None
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_adv))]
    return float(roc_auc_score(labels, np.r_[s_clean, s_adv]))


def _evaluate(
    ctx: StudyContext, det: Detector, x: Tensor, y: Tensor, x_adv: Tensor
) -> dict[str, Any]:
    """Joint success (one Criterion), detection AUC / TPR on fooling examples, clean FPR."""
    xd, yd = x_adv.to(ctx.device), y.to(ctx.device)
    joint = Criterion(ctx.victim, yd, detector=det)(xd).cpu()
    fooled = Criterion(ctx.victim, yd)(xd).cpu()
    s_clean, s_adv = det.score(x).numpy(), det.score(x_adv).numpy()
    thr = det.threshold
    hit = s_adv[fooled.numpy()]
    return {
        "metrics": {
            "attack_success_rate": float(joint.float().mean()),
            "detection_auc": _auc(s_clean, hit),
            "tpr_at_5fpr": float((hit > thr).mean()) if len(hit) else None,
            "clean_fpr": float((s_clean > thr).mean()),
            "victim_fooled_rate": float(fooled.float().mean()),
            "detection_auc_all_adversarial": _auc(s_clean, s_adv),
            "threshold": thr,
        },
        "success": joint,
        "clean_scores": s_clean.tolist(),
        "adv_scores": s_adv.tolist(),
        "fooled": fooled.tolist(),
    }


def run_detector(ctx: StudyContext, name: str) -> list[dict[str, Any]]:
    """One detection entry: non-adaptive and adaptive rows at every eps, figures, checks."""
    start = time.perf_counter()
    x, y, idx = ctx.attack_set(ctx.victim)
    clean_acc = ctx.clean_accuracy(ctx.victim)
    built: dict[float, Built] = {}

    def get(eps: float) -> Built:
        if eps not in built:
            built[eps] = build(ctx, name, eps)
        return built[eps]

    rows: list[dict[str, Any]] = []
    results: dict[tuple[str, float], dict[str, Any]] = {}
    for eps in _eps_values(ctx):
        for attack in ATTACKS:

            def compute(attack: str = attack, eps: float = eps) -> dict[str, Any]:
                b = get(eps)
                x_adv, spec, seconds = _nonadaptive(ctx, attack, eps)
                ev = _evaluate(ctx, b.detector, x, y, x_adv)
                ev["metrics"]["detection_auc_per_attack_fit"] = (
                    None
                    if b.per_attack is None
                    else _auc(
                        (d := b.per_attack(ATTACKS.index(attack))).score(x).numpy(),
                        d.score(x_adv).numpy()[np.asarray(ev["fooled"], bool)],
                    )
                )
                row = make_row(
                    defence=name,
                    family=FAMILY,
                    attack=attack,
                    adaptive=False,
                    eps=eps,
                    n=len(x),
                    clean_accuracy=clean_acc,
                    spec=spec,
                    **ev["metrics"],
                    detector_fit=b.info,
                    attack_seconds=seconds,
                )
                return {k: v for k, v in ev.items() if k != "success"} | {"row": row}

            key = {
                "defence": name,
                "attack": attack,
                "eps_255": _e(eps),
                "what": "non-adaptive",
                "n": len(x),
                "n_fit": N_FIT,
                "also": "per-attack-fit auc",
            }
            results[(attack, eps)] = ctx.cell(key, compute)
            rows.append(results[(attack, eps)]["row"])

        def adaptive(eps: float = eps) -> dict[str, Any]:
            b = get(eps)
            spec = AttackSpec(
                f"adaptive-{name}",
                eps,
                steps=ADAPTIVE_STEPS,
                loss="margin",
                kappa=KAPPA,
                targeted=True,
            )
            res = lambda_ladder_attack(
                ctx.victim,
                b.detector,
                x,
                y,
                spec,
                b.terms,
                batch_size=ctx.profile.batch_size,
                seed=ctx.seed,
                aim=b.aim,
                start=_best_plain(ctx, b.detector, y, eps),
            )
            ev = _evaluate(ctx, b.detector, x, y, res.x_adv)
            path = ctx.save_adversarial(
                f"detection-adaptive-{name}-eps{_e(eps)}", res.x_adv, idx, ev["success"]
            )
            flag_all = Criterion(ctx.victim, y.to(ctx.device), detector=FlagAll())(
                res.x_adv.to(ctx.device)
            ).cpu()
            row = make_row(
                defence=name,
                family=FAMILY,
                attack=f"adaptive-{name}",
                adaptive=True,
                eps=eps,
                n=len(x),
                clean_accuracy=clean_acc,
                spec=res.spec,
                **ev["metrics"],
                detector_fit=b.info,
                attack_seconds=res.seconds,
                lambdas=list(res.lambdas),
                successes_per_lambda=res.per_rung,
                attacker_aim=b.aim,
                aim_quantile=AIM_QUANTILE,
                hinge_slack=HINGE_SLACK,
                reached_aim=res.at_aim,
                loss_terms=b.terms_desc,
                nonfinite_grad_fraction=res.nonfinite_grad_fraction,
                zero_grad_fraction=res.zero_grad_fraction,
            )
            return {k: v for k, v in ev.items() if k != "success"} | {
                "row": row,
                "adversarial": str(path.relative_to(ctx.out)),
                "flag_all_asr": float(flag_all.float().mean()),
            }

        key = {
            "defence": name,
            "attack": "adaptive",
            "eps_255": _e(eps),
            "what": "adaptive",
            "n": len(x),
            "n_fit": N_FIT,
            "steps": ADAPTIVE_STEPS,
            "lambdas": LAMBDAS,
            "kappa": KAPPA,
            "terms": "hinged, gated on target class",
            "aim_quantile": AIM_QUANTILE,
            "hinge_slack": HINGE_SLACK,
        }
        results[("adaptive", eps)] = ctx.cell(key, adaptive)
        rows.append(results[("adaptive", eps)]["row"])
    _report(ctx, name, results, x)
    if COMMON_NOTE not in ctx.notes.get(FAMILY, []):
        ctx.add_note(FAMILY, COMMON_NOTE)
    ctx.add_note(FAMILY, f"{name}: {ASSUMED[name]}")
    ctx.add_note(
        FAMILY,
        f"{name}: entry took {time.perf_counter() - start:.0f} s "
        "(cached cells are not recomputed).",
    )
    return rows


def _report(
    ctx: StudyContext, name: str, results: dict[tuple[str, float], dict[str, Any]], x: Tensor
) -> None:
    """ROC before/after adaptation, evading examples, sanity checks, notes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    eps_list = _eps_values(ctx)
    top = max(eps_list)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for (attack, eps), res in results.items():
        if eps != top:
            continue
        fooled = np.asarray(res["fooled"], bool)
        if not fooled.any():
            continue
        s = np.r_[res["clean_scores"], np.asarray(res["adv_scores"])[fooled]]
        lab = np.r_[np.zeros(len(res["clean_scores"])), np.ones(int(fooled.sum()))]
        fpr, tpr, _ = roc_curve(lab, s)
        auc = res["row"]["detection_auc"]
        style = "-" if attack == "adaptive" else "--"
        ax.plot(
            fpr, tpr, style, lw=2 if attack == "adaptive" else 1, label=f"{attack} (AUC {auc:.2f})"
        )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.axvline(0.05, color="grey", lw=0.5)
    ax.set(
        xlabel="false-positive rate (clean)",
        ylabel="true-positive rate (adversarial)",
        title=f"{name}, eps = {_e(top)}/255",
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = ctx.figure_path(f"detection-{name}-roc.png")
    save_figure(fig, path)
    ctx.add_figure(
        path,
        f"{name}: ROC of the detector before (dashed, non-adaptive attacks) and "
        f"after adaptation (solid) at eps = {_e(top)}/255; adversarial = images that "
        "fool the victim.",
        FAMILY,
    )

    adv = results[("adaptive", top)]
    blob = np.load(ctx.out / adv["adversarial"])
    ok = np.nonzero(blob["success"])[0][:4]
    if len(ok):
        fig, axes = plt.subplots(3, len(ok), figsize=(2 * len(ok), 6), squeeze=False)
        for j, i in enumerate(ok):
            clean, xa = x[i].numpy(), blob["x_adv"][i]
            diff = (xa - clean) / (2 * top) + 0.5
            for r, (img, title) in enumerate(
                ((clean, "clean"), (xa, "adaptive adv."), (diff, "perturbation"))
            ):
                show_image(axes[r, j], img)
                axes[r, j].set_title(title, fontsize=8)
        fig.suptitle(f"{name}: misclassified and not flagged (eps {_e(top)}/255)", fontsize=9)
        fig.tight_layout()
        path = ctx.figure_path(f"detection-{name}-evading.png")
        save_figure(fig, path)
        ctx.add_figure(
            path,
            f"{name}: adaptive adversarial images that fool the victim and "
            "evade the detector (perturbation scaled to the eps range).",
            FAMILY,
        )

    asr = {e: results[("adaptive", e)]["row"]["attack_success_rate"] for e in eps_list}
    best_na = {
        e: max(results[(a, e)]["row"]["attack_success_rate"] for a in ATTACKS) for e in eps_list
    }
    ctx.add_check(
        "adaptive joint ASR >= best non-adaptive joint ASR at every eps",
        all(asr[e] >= best_na[e] for e in eps_list),
        "; ".join(f"{_e(e)}/255: {asr[e]:.3f} vs {best_na[e]:.3f}" for e in eps_list),
        defence=name,
    )
    ctx.add_check(
        "adaptive joint ASR does not decrease with eps",
        all(asr[a] <= asr[b] + 0.02 for a, b in itertools.pairwise(eps_list)),
        ", ".join(f"{_e(e)}/255: {asr[e]:.3f}" for e in eps_list),
        defence=name,
    )
    fprs = [r["row"]["clean_fpr"] for r in results.values()]
    ctx.add_check(
        "clean FPR on test images near the 5% fixed on validation (<= 10%)",
        max(fprs) <= 0.10,
        f"max {max(fprs):.3f}",
        defence=name,
    )
    ctx.add_check(
        "a detector that flags everything gives joint ASR 0",
        all(results[("adaptive", e)]["flag_all_asr"] == 0 for e in eps_list),
        "re-predicted the adaptive images with an always-flag detector",
        defence=name,
    )
    nonfinite = max(results[("adaptive", e)]["row"]["nonfinite_grad_fraction"] for e in eps_list)
    ctx.add_check(
        "adaptive attack gradients finite",
        nonfinite == 0,
        f"non-finite gradient fraction {nonfinite:.3f}",
        defence=name,
    )
    na_auc = [results[(a, top)]["row"]["detection_auc"] for a in ATTACKS]
    ctx.add_check(
        f"target: non-adaptive detection AUC >= 0.9 at {_e(top)}/255",
        all(v is not None and v >= 0.9 for v in na_auc),
        ", ".join(
            f"{a}: {v if v is None else round(v, 3)}" for a, v in zip(ATTACKS, na_auc, strict=True)
        ),
        defence=name,
    )
    for attack, auc in zip(ATTACKS, na_auc, strict=True):
        if auc is not None and auc < 0.9:
            why = _why_low_auc(ctx, results[(attack, top)], attack, top)
            ctx.add_note(FAMILY, f"{name}: {why}")
    per_attack = [results[(a, top)]["row"].get("detection_auc_per_attack_fit") for a in ATTACKS]
    if all(v is not None for v in per_attack):
        ctx.add_check(
            f"non-adaptive detection AUC >= 0.9 at {_e(top)}/255, one detector per attack "
            "(Ma et al.'s protocol)",
            min(per_attack) >= 0.9,
            ", ".join(f"{a}: {v:.3f}" for a, v in zip(ATTACKS, per_attack, strict=True)),
            defence=name,
        )
    ad = results[("adaptive", top)]["row"]
    ctx.add_check(
        f"target: adaptive joint ASR >= 0.9 at {_e(top)}/255",
        ad["attack_success_rate"] >= TARGET_ASR,
        f"{ad['attack_success_rate']:.3f} (victim fooled {ad['victim_fooled_rate']:.3f})",
        defence=name,
    )
    ad_auc = ad["detection_auc"]
    ctx.add_check(
        f"target: adaptive detection AUC <= 0.6 at {_e(top)}/255",
        ad_auc is not None and ad_auc <= 0.6,
        f"{ad_auc}",
        defence=name,
    )
    reached = [e for e in eps_list if asr[e] >= TARGET_ASR]
    ctx.add_note(
        FAMILY,
        f"{name}: smallest eps at which the adaptive joint ASR reaches "
        f"{TARGET_ASR:.0%}: "
        + (
            f"{_e(min(reached))}/255."
            if reached
            else f"not reached up to {_e(top)}/255 (ASR {asr[top]:.3f})."
        ),
    )


def _why_low_auc(ctx: StudyContext, res: dict[str, Any], attack: str, eps: float) -> str:
    """Detection AUC of the fooling images split at the median of the victim's confidence in
    the wrong class: shows whether weakly fooling images are what the detector misses."""
    x_adv = _nonadaptive(ctx, attack, eps)[0]
    fooled = np.asarray(res["fooled"], bool)
    conf = predict_proba(ctx.victim, x_adv, device=ctx.device).max(1)[fooled]
    s_adv = np.asarray(res["adv_scores"])[fooled]
    s_clean = np.asarray(res["clean_scores"])
    low = conf < np.median(conf)
    a_low, a_high = _auc(s_clean, s_adv[low]), _auc(s_clean, s_adv[~low])
    return (
        f"{attack} at {_e(eps)}/255 is detected with AUC {res['row']['detection_auc']:.3f} "
        f"only. Split at the median confidence of the victim in the wrong class "
        f"({np.median(conf):.6g}): AUC {_f(a_low)} for the less confident half, {_f(a_high)} "
        "for the more confident half. "
        + (
            "Images that only just cross the decision boundary (as a single step leaves "
            "them) move the deep features less and are harder to detect; iterative attacks, "
            "run to the end as in the papers, push deep into the wrong class."
            if a_low is not None and a_high is not None and a_low < a_high
            else "Weakly fooling images are not the reason here."
        )
    )


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


ENTRIES = {
    "ma-kd-bu": "Ma et al. 2021: kernel density + MC-dropout uncertainty, LR",
    "ma-lid": "Ma et al. 2021: local intrinsic dimensionality (k=20), LR",
    "ma-deepfeat": "Ma et al. 2021: random forest (30 trees), deep features",
    "li-zhu-mgm": "Li & Zhu 2020: unsupervised Gaussian models of features",
}


def _entry(name: str) -> Callable[[StudyContext], list[dict[str, Any]]]:
    return lambda ctx: run_detector(ctx, name)


for _name, _summary in ENTRIES.items():
    register_defence(_name, FAMILY, _summary)(_entry(_name))
