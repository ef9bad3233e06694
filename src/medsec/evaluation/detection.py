"""The generic evaluator of the detection family: any detector Defence -> rows, checks, notes.

Per detector and eps in {1, 2, 4}/255 (the profile's eps values that match):
1. fit through the one detector interface: ``fit(x_clean, y_clean, x_adv)`` on the victim's
   training images; a supervised detector also gets adversarial versions of the last
   ``N_FIT`` (a quarter each from FGSM, BIM, PGD-20 and CW-L-inf at that eps, run to the end
   as in the papers) - one detector per eps; the threshold is then fixed at 5% false
   positives on clean validation images;
2. non-adaptive rows: FGSM, BIM, PGD-20, CW-L-inf on the victim alone (run to the end, no
   early stop, as the papers did; the same images serve every detector);
3. adaptive rows: per example the worst case of the plain attacks (lambda = 0) and the
   lambda-ladder attack with the defence's own attack terms (or, for a plug-in that declares
   none, its differentiable score hinged), the detector in the success criterion.
Metrics: joint ASR (misclassified AND not flagged, over the n attacked images),
``detection_auc`` (clean attacked images vs their adversarial versions that fool the
victim), ``tpr_at_5fpr``, ``clean_fpr`` (clean attacked test images flagged).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medsec.attacks import AttackSpec, Criterion, LossTerm, preset, run_attack
from medsec.defences.base import Defence, FitData
from medsec.defences.detection.adaptive import (
    AIM_QUANTILE,
    HINGE_SLACK,
    KAPPA,
    LAMBDAS,
    Hinge,
    detector_hinge,
)
from medsec.errors import MedsecError
from medsec.evaluation import detection_validity as validity
from medsec.evaluation import headline
from medsec.evaluation import indicators as ind
from medsec.evaluation.context import StudyContext, make_row
from medsec.evaluation.detection_report import COMMON_NOTE, N_FIT, auc, report, two_sided_tpr

FAMILY = "detection"
ATTACKS = ("fgsm", "bim", "pgd-20", "cw-linf")
EPS_255 = (1.0, 2.0, 4.0)
MIN_PAIRS = 20  # successful pairs a supervised fit needs (5-fold CV, 2 classes)
MIN_REFIT_PAIRS = 5  # pairs of one attack a per-attack refit needs (one per CV fold)


@dataclass
class Fitted:
    """A fitted detector at its fixed threshold plus the informed attacker's loss terms."""

    detector: Any
    info: dict[str, Any]
    terms: list[tuple[float, LossTerm]]
    terms_desc: str
    aim: float
    fit: FitData
    y_fit: Tensor  # labels of the clean fit images
    attack_of: Tensor | None = None  # per adversarial fit image: index into ATTACKS


def eps_values(ctx: StudyContext) -> list[float]:
    eps = [e for e in ctx.profile.eps if round(e * 255, 3) in EPS_255]
    if not eps:
        raise MedsecError(f"profile {ctx.profile.name} has none of eps {EPS_255}/255")
    return eps


def e255(eps: float) -> str:
    return f"{eps * 255:g}"


def _quarter(i: int, n: int) -> Tensor:
    """Indices of the fit set's quarter attacked by ``ATTACKS[i]``."""
    return torch.arange(n).chunk(len(ATTACKS))[i]


def _fit_data(
    ctx: StudyContext, eps: float, supervised: bool
) -> tuple[FitData, Tensor, Tensor | None, str]:
    """Reference / fit split of the training images: (fit data, clean fit labels, attack of
    each adversarial fit image, what the adversarial fit images are). A supervised detector
    gets, as Ma et al. fit theirs, only the pairs whose clean image the victim classifies
    correctly and whose adversarial version (a quarter each from ``ATTACKS``) it
    misclassifies; where fewer than ``MIN_PAIRS`` succeed (smoke profiles), every pair with
    a correct clean image."""
    x = torch.from_numpy(ctx.data.train.images)
    y = torch.from_numpy(ctx.data.train.labels)
    n_fit = min(N_FIT, len(x) // 4)
    x_fit, y_fit = x[-n_fit:], y[-n_fit:]
    x_adv, attack_of, fit_on = None, None, "clean images only (unsupervised)"
    if supervised:

        def make() -> dict[str, Tensor]:
            parts = []
            for i in range(len(ATTACKS)):
                q = _quarter(i, n_fit)
                spec = preset(ATTACKS[i], eps, early_stop=False)
                res = run_attack(
                    ctx.victim,
                    x_fit[q],
                    y_fit[q],
                    spec,
                    batch_size=ctx.profile.batch_size,
                    seed=ctx.seed + i,
                )
                parts.append(res.x_adv)
            return {"x_adv": torch.cat(parts)}

        name = f"detection/fit-adv-eps{e255(eps)}-{ctx.precision}"
        x_adv = ctx.store.tensors(name, make)["x_adv"]
        right, fooled = _pair_masks(ctx, x_fit, y_fit, x_adv)
        keep = right & fooled
        fit_on = "successful adversarial examples of correctly classified images (Ma et al.)"
        if int(keep.sum()) < MIN_PAIRS:  # a smoke profile: too few successes to fit a head
            keep = right
            fit_on = (
                f"every attack output of a correctly classified image: fewer than {MIN_PAIRS} "
                "succeeded (a smoke profile)"
            )
        attack_of = torch.cat(
            [torch.full((len(_quarter(i, n_fit)),), i) for i in range(len(ATTACKS))]
        )[keep]
        x_fit, y_fit, x_adv = x_fit[keep], y_fit[keep], x_adv[keep]
    val = torch.from_numpy(ctx.data.val.images)
    fit = FitData(x[:-n_fit], y[:-n_fit], x_fit, x_adv, val, ctx.seed, ctx.device)
    return fit, y_fit, attack_of, fit_on


def _pair_masks(ctx: StudyContext, x: Tensor, y: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """(the victim gets ``x`` right, the one Criterion calls ``x_adv`` a success) per pair:
    a failed attack or an already-misclassified image is no adversarial example."""
    right, fooled = [], []
    bs = ctx.profile.batch_size
    for s in range(0, len(x), bs):
        yb = y[s : s + bs].to(ctx.device)
        crit = Criterion(ctx.victim, yb)
        right.append((crit.predict(x[s : s + bs].to(ctx.device)) == yb).cpu())
        fooled.append(crit(x_adv[s : s + bs].to(ctx.device)).cpu())
    none = torch.zeros(0, dtype=torch.bool)
    return (torch.cat(right), torch.cat(fooled)) if right else (none, none)


def fitted(ctx: StudyContext, defence: Defence, eps: float) -> Fitted:
    """Build ``defence``, fit its detector for ``eps``, fix its threshold, build the
    attacker's terms and aim (the ``AIM_QUANTILE`` of clean validation scores).

    Fitting runs on its own seeded random stream and leaves the caller's untouched, so the
    fitted detector (e.g. a surrogate's initial weights) is the same whichever cell first
    needs it, in a fresh run or a resumed one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        return _fitted(ctx, defence, eps)


def _fitted(ctx: StudyContext, defence: Defence, eps: float) -> Fitted:
    dep = defence.build(ctx.victim, ctx.data, ctx.build_env())
    det = dep.detector
    if det is None:
        raise MedsecError(f"{defence.name}: a detection defence must deploy a detector")
    fit, y_fit, attack_of, fit_on = _fit_data(ctx, eps, bool(getattr(det, "supervised", False)))
    x_all = torch.cat([fit.x_ref, fit.x_fit])
    y_all = torch.cat([fit.y_ref, y_fit])
    info = det.fit(x_all, y_all, fit.x_adv) or {}
    if attack_of is not None:
        info["fit_pairs"] = {a: int((attack_of == i).sum()) for i, a in enumerate(ATTACKS)}
        info["fit_on"] = fit_on
    det.set_threshold(fit.x_val)
    if dep.attack_terms is not None:
        terms, desc = dep.attack_terms(det, fit)
    elif getattr(det, "differentiable", False):
        hinge = Hinge.from_clean(det.score_samples(fit.x_val).numpy())
        terms, desc = [(1.0, detector_hinge(det, hinge))], "the detector's own score, hinged"
    else:
        terms, desc = [], "none declared and the score is not differentiable: plain margin"
    clean_val = det.score_samples(fit.x_val).numpy()
    aim = float(np.quantile(clean_val, AIM_QUANTILE))
    return Fitted(det, info, terms, desc, aim, fit, y_fit, attack_of)


def refit_on_attack(f: Fitted, i: int) -> Any:
    """Ma et al.'s protocol: a copy of the detector refitted on ONE attack's successful
    pairs of the fit set (the deployed detector is untouched); None for unsupervised ones,
    and where that attack left fewer than ``MIN_REFIT_PAIRS`` pairs (no AUC beats a crash)."""
    if f.fit.x_adv is None or f.attack_of is None:
        return None
    q = f.attack_of == i
    if int(q.sum()) < MIN_REFIT_PAIRS:
        return None
    other = copy.copy(f.detector)
    x_clean = torch.cat([f.fit.x_ref, f.fit.x_fit[q]])
    other.fit(x_clean, torch.cat([f.fit.y_ref, f.y_fit[q]]), f.fit.x_adv[q])
    return other


def nonadaptive(ctx: StudyContext, attack: str, eps: float) -> tuple[Tensor, AttackSpec, float]:
    """The victim-only attack (shared by every detector), saved for the signature gate."""
    x, y, idx = ctx.attack_set(ctx.victim)
    spec = preset(attack, eps, early_stop=False)

    def make() -> dict[str, Tensor]:
        res = run_attack(ctx.victim, x, y, spec, batch_size=ctx.profile.batch_size, seed=ctx.seed)
        ctx.save_adversarial(f"detection-{attack}-eps{e255(eps)}", res.x_adv, idx, res.success)
        return {"x_adv": res.x_adv, "seconds": torch.tensor(res.seconds)}

    blob = ctx.store.tensors(f"detection/nonadaptive-{attack}-eps{e255(eps)}-{ctx.precision}", make)
    return blob["x_adv"], spec, float(blob["seconds"])


def _best_plain(ctx: StudyContext, det: Any, y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per example, the first plain (non-adaptive) attack image that is a joint success."""
    best, done = None, torch.zeros(len(y), dtype=torch.bool)
    for attack in ATTACKS:
        x_adv = nonadaptive(ctx, attack, eps)[0]
        best = x_adv.clone() if best is None else best
        ok = Criterion(ctx.victim, y.to(ctx.device), detector=det)(x_adv.to(ctx.device)).cpu()
        new = ok & ~done
        best[new], done = x_adv[new], done | ok
    assert best is not None
    return best, done


def evaluate_scores(
    ctx: StudyContext, det: Any, x: Tensor, y: Tensor, x_adv: Tensor
) -> dict[str, Any]:
    """Joint success (one Criterion), detection AUC / TPR on fooling examples, clean FPR."""
    xd, yd = x_adv.to(ctx.device), y.to(ctx.device)
    joint = Criterion(ctx.victim, yd, detector=det)(xd).cpu()
    fooled = Criterion(ctx.victim, yd)(xd).cpu()
    s_clean, s_adv = det.score_samples(x), det.score_samples(x_adv)
    hit = s_adv[fooled]
    return {
        "success": joint,
        "metrics": {
            "attack_success_rate": float(joint.float().mean()),
            "detection_auc": auc(s_clean.numpy(), hit.numpy()),
            "tpr_at_5fpr": float(det.flagged(hit).float().mean()) if len(hit) else None,
            "tpr_two_sided_at_5fpr": two_sided_tpr(s_clean.numpy(), hit.numpy()),
            "tpr_n": len(hit),
            "clean_fpr": float(det.flagged(s_clean).float().mean()),
            "victim_fooled_rate": float(fooled.float().mean()),
            "detection_auc_all_adversarial": auc(s_clean.numpy(), s_adv.numpy()),
            "threshold": det.threshold,
        },
        "clean_scores": s_clean.tolist(),
        "adv_scores": s_adv.tolist(),
        "fooled": fooled.tolist(),
    }


def _joint(row: dict[str, Any]) -> float:
    return float(row["attack_success_rate"])


def evaluate_detection(ctx: StudyContext, defence: Defence) -> list[dict[str, Any]]:
    """One detection entry: non-adaptive and adaptive rows at every eps, figures, checks."""
    name = defence.name
    x, y, idx = ctx.attack_set(ctx.victim)
    clean_acc = ctx.clean_accuracy(ctx.victim)
    built: dict[float, Fitted] = {}

    def get(eps: float) -> Fitted:
        if eps not in built:
            built[eps] = fitted(ctx, defence, eps)
        return built[eps]

    rows: list[dict[str, Any]] = []
    results: dict[tuple[str, float], dict[str, Any]] = {}
    common = {"defence": name, "family": FAMILY, "n": len(x), "clean_accuracy": clean_acc}
    work = defence.working_eps
    if work and work < min(eps_values(ctx)):  # a smoke profile's grid: too few successes there
        work = None  # to fit on; judged where the gain is largest instead, and said so
    for eps in headline.budgets(tuple(eps_values(ctx)), work):
        for i, attack in enumerate(ATTACKS):

            def compute(i: int = i, attack: str = attack, eps: float = eps) -> dict[str, Any]:
                f = get(eps)
                x_adv, spec, seconds = nonadaptive(ctx, attack, eps)
                ev = evaluate_scores(ctx, f.detector, x, y, x_adv)
                ev.pop("success")
                other = refit_on_attack(f, i)
                fooled = np.asarray(ev["fooled"], bool)
                ev["metrics"]["detection_auc_per_attack_fit"] = (
                    None
                    if other is None
                    else auc(
                        other.score_samples(x).numpy(), other.score_samples(x_adv).numpy()[fooled]
                    )
                )
                row = make_row(
                    **common,
                    attack=attack,
                    adaptive=False,
                    eps=eps,
                    spec=spec,
                    **ev.pop("metrics"),
                    detector_fit=f.info,
                    attack_seconds=seconds,
                )
                return ev | {"row": row}

            key = {
                "defence": name,
                "attack": attack,
                "eps_255": e255(eps),
                "what": "non-adaptive",
                "n": len(x),
                "n_fit": N_FIT,
                "also": "per-attack-fit auc",
            }
            results[(attack, eps)] = ctx.cell(key, compute)
            rows.append(results[(attack, eps)]["row"])

        def adaptive(eps: float = eps) -> dict[str, Any]:
            f = get(eps)
            start = _best_plain(ctx, f.detector, y, eps)
            res = validity.informed_attack(ctx, name, f, x, y, eps, start=start)
            ev = evaluate_scores(ctx, f.detector, x, y, res.x_adv)
            ev["indicators"] = validity.indicators(ctx, x, y, res, ev["success"])
            path = ctx.save_adversarial(
                f"detection-adaptive-{name}-eps{e255(eps)}", res.x_adv, idx, ev.pop("success")
            )
            row = make_row(
                **common,
                attack=f"adaptive-{name}",
                adaptive=True,
                eps=eps,
                spec=res.spec,
                **ev.pop("metrics"),
                detector_fit=f.info,
                attack_seconds=res.seconds,
                lambdas=list(res.lambdas),
                successes_per_lambda=res.per_rung,
                attacker_aim=f.aim,
                aim_quantile=AIM_QUANTILE,
                hinge_slack=HINGE_SLACK,
                reached_aim=res.at_aim,
                loss_terms=f.terms_desc,
                working_eps=defence.working_eps,
                nonfinite_grad_fraction=res.nonfinite_grad_fraction,
                zero_grad_fraction=res.zero_grad_fraction,
            )
            return ev | {"row": row, "adversarial": str(path.relative_to(ctx.out))}

        key = {
            "defence": name,
            "attack": "adaptive",
            "eps_255": e255(eps),
            "what": "adaptive",
            "n": len(x),
            "n_fit": N_FIT,
            "steps": ctx.profile.detection_steps,
            "lambdas": LAMBDAS,
            "kappa": KAPPA,
            "terms": "hinged, gated on target class",
            "indicators": ind.SETTINGS,
            "aim_quantile": AIM_QUANTILE,
            "hinge_slack": HINGE_SLACK,
        }
        results[("adaptive", eps)] = ctx.cell(key, adaptive)
        rows.append(results[("adaptive", eps)]["row"])
    grid = sorted({e for _, e in results})
    top = max(grid)
    by_eps = {e: results[("adaptive", e)].get("indicators", []) for e in grid}
    by_eps[top] = by_eps[top] + [validity.unconstrained(ctx, name, get(top), x, y, top)]
    ind.add_checks(ctx, name, by_eps)
    plain = {e: max((results[(a, e)]["row"] for a in ATTACKS), key=_joint) for e in grid}
    gains = {e: r["victim_fooled_rate"] - _joint(r) for e, r in plain.items()}
    w, why = headline.working_budget(work, gains, top)
    if work is None and defence.working_eps:
        why += f"; its paper's {defence.working_eps * 255:g}/255 is below this profile's grid"
    sq = validity.square(ctx, name, get(w), x, y, results[("adaptive", w)], w)
    key = {"n_fit": N_FIT, "steps": ctx.profile.detection_steps, "lambdas": LAMBDAS}
    validity.binarization(ctx, name, get(w), x, y, w, key | {"kappa": KAPPA})
    fooled = {e: max(results[(a, e)]["row"]["victim_fooled_rate"] for a in ATTACKS) for e in grid}
    n, best = len(x), plain[w]
    rates = {
        "undefended": (fooled[w], n),
        "paper_attack": (_joint(best), n),
        "whitebox": (_joint(best), n),  # the papers' attacks ARE plain white-box on the victim
        "adaptive": (_joint(results[("adaptive", w)]["row"]), n),
        "square": (sq["asr"], len(sq["success"])),
    }
    note = ("for a detector the papers' attacks already are plain white-box attacks on the "
            "classifier (the detector unaware): white-box = the paper's attack")  # fmt: skip
    ctx.add_headline(headline.record(name, FAMILY, w, why, rates, best["attack"], [note]))
    for r in rows:  # the verdict compares with the same undefended rate, on the same images
        r["headline_eps"] = w
        if r["adaptive"]:
            r["undefended_asr"] = fooled[r["eps"]]
    ctx.add_note(COMMON_NOTE, family=FAMILY)
    ctx.add_note(
        f"{name}: {defence.paper or defence.summary}."
        + (" Assumed: " + "; ".join(defence.assumptions) + "." if defence.assumptions else ""),
        family=FAMILY,
        defence=name,
    )
    report(ctx, name, results, x, lambda a, e: nonadaptive(ctx, a, e)[0], ATTACKS)
    return rows
