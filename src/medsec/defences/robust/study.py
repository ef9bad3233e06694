"""Study entries of the robustification family: ``ssat``, ``kmm``, ``dae``, ``medrdf``,
``pgd-at``.

Each entry (1) trains the defence once (cached in OUT/artifacts/robust/), (2) evaluates it
non-adaptively as its paper did and compares with the undefended victim under the same
attack, (3) attacks the whole deployed pipeline adaptively (margin loss, many steps,
restarts; EOT over MedRDF's noise with BPDA around its vote; success re-predicted with the
deployed vote count, repeated, spread reported), (4) runs the gradient-masking diagnostics
and the evaluation.md item-8 fixtures, and (5) redraws one robust-accuracy-vs-eps figure
with every defence evaluated so far and the undefended victim.

Robust accuracy = clean test accuracy x (1 - per-example worst-case ASR), the ASR being
measured on the first n test images the deployed pipeline classifies correctly.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medsec.attacks import (
    EOT,
    AttackSpec,
    Criterion,
    Objective,
    logits_forward,
    margin,
    preset,
    run_attack,
)
from medsec.defences import register_defence
from medsec.defences.robust import dae as dae_module
from medsec.defences.robust import diagnostics as diag
from medsec.defences.robust import kmm as kmm_module
from medsec.defences.robust import medrdf as medrdf_module
from medsec.defences.robust import pgd_at as pgd_at_module
from medsec.defences.robust import ssat as ssat_module
from medsec.defences.robust.common import RobustTrainConfig, load_or_train
from medsec.defences.robust.dae import DAEClassifier, DenoisingAutoEncoder, train_dae
from medsec.defences.robust.kmm import KMMNet, train_kmm
from medsec.defences.robust.medrdf import MedRDF, MedRDFAttackView
from medsec.defences.robust.pgd_at import RAMP, TRAIN_EPS, TRAIN_STEPS, train_pgd_at
from medsec.defences.robust.ssat import train_ssat
from medsec.evaluation.context import StudyContext, make_row
from medsec.models.architectures import SmallCNN

FAMILY = "robustification"
TARGET_EPS = 4 / 255
TARGET_ASR = 0.90
GAIN_MIN = 0.05  # a non-adaptive ASR drop below this is "no gain"
TOLERANCE = 0.05  # convergence / step-size tolerance (absolute ASR)
N_CAP = 200  # attacked images per defence (CPU budget), MedRDF half of it
N_DIAG = 48  # images for the step-size sweep, the long run and the fixtures
STEPS = 50
STEP_FACTORS = (2.5, 10.0, 50.0)  # one per restart: alpha = factor * eps / STEPS
RESTARTS = len(STEP_FACTORS)
EOT_SAMPLES = 10
REPEATS = 5  # evaluations of a randomised pipeline's success
SWEEP = (0.5, 1.0, 2.5, 10.0, 50.0)
SSAT_PAPER_EPS = (0.001, 0.002, 0.003)


@dataclass
class Deployed:
    """A trained defence as deployed, plus what the adaptive attacker differentiates."""

    name: str
    pipeline: nn.Module
    attack_view: nn.Module
    transfer: bool  # non-adaptive attacks computed on the undefended victim (defence unaware)
    paper_attacks: list[AttackSpec]
    train_record: dict[str, Any]
    eot: int = 1
    repeats: int = 1
    bpda: str = "none"
    n: int = N_CAP
    reseed: Callable[[int], None] | None = None
    extra_diag: Callable[[Tensor], dict[str, float]] | None = None
    assumptions: list[str] = field(default_factory=list)
    module: Any = None  # the defence's module, whose docstring states its assumptions


# ---- building (training once, cached) ----------------------------------------------------
def _trained(
    ctx: StudyContext,
    name: str,
    model: nn.Module,
    cfg: RobustTrainConfig,
    train: Callable[[], dict[str, Any]],
    settings: str = "",
) -> dict[str, Any]:
    """Train once; the file name holds data, victim, config and the defence's own
    ``settings``, and becomes the record's ``artifact`` (cells are keyed on it)."""
    tag = f"{ctx.data.content_hash[:10]}-{ctx.victim_meta.get('sha256', '')[:10]}"
    cfg_tag = "-".join(f"{v}" for v in cfg.record().values())
    path = ctx.artifact(f"robust/{name}-{tag}-{cfg_tag}{settings}.pt")
    return load_or_train(path, model, train) | {"artifact": path.name}


def _train_id(dep: Deployed) -> Any:
    """What identifies the trained defence in cell keys (never volatile fields like time)."""
    return dep.train_record.get("artifact") or {
        k: v for k, v in dep.train_record.items() if k not in ("cached", "train_seconds")
    }


def _config(ctx: StudyContext, epochs: int, lr: float) -> RobustTrainConfig:
    return RobustTrainConfig(epochs=epochs, batch_size=64, lr=lr, seed=ctx.seed)


def _paper_grid(eps: tuple[float, ...]) -> list[AttackSpec]:
    return [preset(a, e) for a in ("fgsm", "pgd-20") for e in eps]


def build_ssat(ctx: StudyContext) -> Deployed:
    model = copy.deepcopy(ctx.victim).to(ctx.device)
    cfg = _config(ctx, epochs=2, lr=5e-4)
    rec = _trained(
        ctx, "ssat", model, cfg, lambda: train_ssat(model, ctx.data, cfg, device=ctx.device)
    )
    attacks = [preset("fgsm", e) for e in SSAT_PAPER_EPS] + _paper_grid(ctx.profile.eps)
    return Deployed("ssat", model.eval(), model, False, attacks, rec)


def build_kmm(ctx: StudyContext) -> Deployed:
    if isinstance(ctx.victim, SmallCNN):
        model = KMMNet.from_victim(ctx.victim, seed=ctx.seed)
        start = "the victim's weights (mapped half of the next convs at zero)"
    else:
        torch.manual_seed(ctx.seed)
        model = KMMNet(ctx.data.channels, ctx.data.num_classes)
        start = "scratch (the victim is not a small-cnn)"
    model = model.to(ctx.device)
    cfg = _config(ctx, epochs=3, lr=1e-3)
    rec = _trained(
        ctx, "kmm", model, cfg, lambda: train_kmm(model, ctx.data, cfg, device=ctx.device)
    )
    dep = Deployed("kmm", model.eval(), model, False, _paper_grid(ctx.profile.eps), rec)
    dep.extra_diag = model.saturation
    dep.assumptions.append(f"KMM network trained end to end from {start}.")
    return dep


def build_dae(ctx: StudyContext) -> Deployed:
    torch.manual_seed(ctx.seed)
    model = DAEClassifier(DenoisingAutoEncoder(ctx.data.channels), copy.deepcopy(ctx.victim))
    model = model.to(ctx.device)
    cfg = _config(ctx, epochs=3, lr=1e-3)
    rec = _trained(
        ctx, "dae", model, cfg, lambda: train_dae(model, ctx.data, cfg, device=ctx.device)
    )
    return Deployed("dae", model.eval(), model, True, _paper_grid(ctx.profile.eps), rec)


def build_medrdf(ctx: StudyContext) -> Deployed:
    model = MedRDF(ctx.victim, seed=ctx.seed)
    rec = {"retrain_free": True, "sigma": model.sigma, "votes": model.votes}
    view = MedRDFAttackView(model, copies=1)
    return Deployed(
        "medrdf",
        model.eval(),
        view,
        True,
        _paper_grid(ctx.profile.eps),
        rec,
        eot=EOT_SAMPLES,
        repeats=REPEATS,
        bpda="majority vote: exact forward, backward = gradient of log mean softmax of the copies",
        n=N_CAP // 2,
        reseed=model.reseed,
    )


def build_pgd_at(ctx: StudyContext) -> Deployed:
    model = copy.deepcopy(ctx.victim).to(ctx.device)
    cfg = _config(ctx, epochs=6, lr=5e-4)
    rec = _trained(
        ctx,
        "pgd-at",
        model,
        cfg,
        lambda: train_pgd_at(model, ctx.data, cfg, device=ctx.device),
        settings=f"-eps{TRAIN_EPS * 255:g}-k{TRAIN_STEPS}-ramp{RAMP}",
    )
    attacks = [preset("pgd-20", e) for e in ctx.profile.eps]
    dep = Deployed("pgd-at", model.eval(), model, False, attacks, rec)
    dep.assumptions.append(f"PGD-AT trained at eps = {TRAIN_EPS * 255:g}/255.")
    return dep


# ---- evaluation cells ---------------------------------------------------------------------
def _success(dep: Deployed, x_adv: Tensor, y: Tensor, seed: int, batch: int) -> Tensor:
    """(repeats, N) success re-predicted through the deployed pipeline (fresh noise each)."""
    out = []
    device = next(dep.pipeline.parameters()).device
    for r in range(dep.repeats):
        if dep.reseed is not None:
            dep.reseed(seed + 7919 * (r + 1))
        ok = [
            Criterion(dep.pipeline, y[s : s + batch].to(device))(x_adv[s : s + batch].to(device))
            for s in range(0, len(x_adv), batch)
        ]
        out.append(torch.cat(ok).cpu())
    return torch.stack(out)


def _summary(succ: Tensor) -> dict[str, Any]:
    rates = succ.float().mean(1)
    return {
        "asr": float(rates.mean()),
        "asr_std": float(rates.std()) if len(rates) > 1 else 0.0,
        "asr_runs": rates.tolist(),
        "success": (succ.float().mean(0) >= 0.5).tolist(),  # per example, majority of runs
    }


def _spec_key(spec: AttackSpec) -> dict[str, Any]:
    return {"attack": spec.name, "eps_255": round(spec.eps * 255, 4), "spec": spec.record()}


def _adaptive_spec(dep: Deployed, eps: float, **over: Any) -> AttackSpec:
    name = (
        "adaptive-margin"
        + ("-eot" if dep.eot > 1 else "")
        + ("-bpda" if dep.bpda != "none" else "")
    )
    kw: dict[str, Any] = {
        "steps": STEPS,
        "restarts": RESTARTS,
        "restart_step_factors": STEP_FACTORS,
        "loss": "margin",
        "eot_samples": dep.eot,
    }
    kw.update(over)
    return AttackSpec(name, eps, **kw)


def _objective_factory(dep: Deployed) -> Callable[[Tensor, Tensor], Any]:
    def make(labels: Tensor, idx: Tensor) -> Any:
        obj = Objective(logits_forward(dep.attack_view), [(1.0, margin())], labels)
        return EOT(obj, dep.eot, batched=True) if dep.eot > 1 else obj

    return make


def _attack_cell(
    ctx: StudyContext,
    dep: Deployed,
    spec: AttackSpec,
    x: Tensor,
    y: Tensor,
    idx: Tensor,
    *,
    adaptive: bool,
    what: str,
) -> dict[str, Any]:
    """One attack on the defence (cached); success re-predicted through the deployed pipeline."""

    def compute() -> dict[str, Any]:
        if dep.reseed is not None:
            dep.reseed(ctx.seed)
        if adaptive:
            res = run_attack(
                dep.pipeline,
                x,
                y,
                spec,
                objective_factory=_objective_factory(dep),
                batch_size=ctx.profile.batch_size,
                seed=ctx.seed,
            )
        else:
            source = ctx.victim if dep.transfer else dep.pipeline
            res = run_attack(source, x, y, spec, batch_size=ctx.profile.batch_size, seed=ctx.seed)
        succ = _success(dep, res.x_adv, y, ctx.seed, ctx.profile.batch_size)
        summary = _summary(succ)
        ctx.save_adversarial(
            f"{dep.name}-{what}-{spec.name}-{spec.eps * 255:g}",
            res.x_adv,
            idx,
            torch.tensor(summary["success"]),
            defence=dep.name,
            attack=spec.name,
            eps=spec.eps,
            adaptive=adaptive,
        )
        extra = {}
        if dep.extra_diag is not None:
            extra = {
                "saturation_clean": dep.extra_diag(x.to(ctx.device)),
                "saturation_adversarial": dep.extra_diag(res.x_adv.to(ctx.device)),
            }
        return {
            **summary,
            "seconds": res.seconds,
            "loss_curve": res.loss_curve[:400],
            **diag.gradient_stats(res),
            "max_linf": float((res.x_adv - x).abs().max()) if len(x) else 0.0,
            **extra,
        }

    key = {"defence": dep.name, "what": what, "n": len(x), **_spec_key(spec)}
    key.update(train=_train_id(dep), eot=dep.eot, repeats=dep.repeats)
    return ctx.cell(key, compute)


def _reference_cell(ctx: StudyContext, spec: AttackSpec, n: int, what: str) -> dict[str, Any]:
    """The same attack on the undefended victim (its own correctly classified images)."""
    x, y, idx = ctx.attack_set(ctx.victim, n)

    def compute() -> dict[str, Any]:
        obj = diag.margin_objective_factory(ctx.victim) if spec.loss == "margin" else None
        res = run_attack(
            ctx.victim,
            x,
            y,
            spec,
            objective_factory=obj,
            batch_size=ctx.profile.batch_size,
            seed=ctx.seed,
        )
        ctx.save_adversarial(
            f"none-robust-{what}-{spec.name}-{spec.eps * 255:g}",
            res.x_adv,
            idx,
            res.success,
            defence="none",
            attack=spec.name,
            eps=spec.eps,
            adaptive=what == "adaptive",
        )
        return {"asr": float(res.success.float().mean()), "seconds": res.seconds}

    key = {"defence": "none", "what": f"robust-reference-{what}", "n": len(x), **_spec_key(spec)}
    return ctx.cell(key, compute)


# ---- the entry ----------------------------------------------------------------------------
def _eps_at_10(curve: list[tuple[float, float]]) -> float | None:
    for eps, acc in sorted(curve):
        if acc <= 0.10:
            return eps
    return None


def _fixtures(ctx: StudyContext) -> None:
    """evaluation.md item 8, once per study run (cached across runs)."""
    if any(c.check.startswith("fixture:") for c in ctx.checks):
        return
    x, y, _ = ctx.attack_set(ctx.victim, N_DIAG)
    eps = 8 / 255
    res = ctx.cell(
        {"defence": "none", "what": "robust-fixtures", "eps_255": 8, "n": len(x), "steps": STEPS},
        lambda: diag.run_fixtures(ctx.victim, x, y, eps, STEPS, seed=ctx.seed),
    )
    u, i, k, kb = res["undefended"], res["identity"], res["killer"], res["killer_bpda"]
    ctx.add_check(
        "fixture: undefended victim falls to ~0% robust accuracy",
        u["asr"] >= 0.98,
        f"adaptive margin PGD at 8/255 on {len(x)} images: ASR {u['asr']:.3f}",
        defence="none",
    )
    ctx.add_check(
        "fixture: identity defence beaten by the adaptive attack",
        i["asr"] >= 0.98 and abs(i["asr"] - u["asr"]) <= 0.02,
        f"ASR {i['asr']:.3f} (victim {u['asr']:.3f})",
        defence="none",
    )
    ctx.add_check(
        "fixture: gradient-killing layer masks plain PGD and is beaten with BPDA",
        k["zero_grad_fraction"] == 1.0 and kb["asr"] >= 0.98,
        f"plain PGD-20: zero-gradient fraction {k['zero_grad_fraction']:.2f}, ASR "
        f"{k['asr']:.3f}; adaptive + BPDA(identity backward): ASR {kb['asr']:.3f}",
        defence="none",
    )


def _diagnostics(
    ctx: StudyContext, dep: Deployed, x: Tensor, y: Tensor, idx: Tensor, main: dict[str, Any]
) -> dict[str, Any]:
    """Convergence (2x steps, 2x restarts), step-size sweep, unbounded attack, at 4/255."""
    n_diag = N_DIAG if dep.eot == 1 else N_DIAG // 2  # EOT multiplies the cost
    xd, yd, idd = x[:n_diag], y[:n_diag], idx[:n_diag]
    long = _attack_cell(
        ctx,
        dep,
        _adaptive_spec(dep, TARGET_EPS, steps=2 * STEPS, restarts=2 * RESTARTS),
        xd,
        yd,
        idd,
        adaptive=True,
        what="diag-long",
    )
    curve_cell = _attack_cell(
        ctx,
        dep,
        _adaptive_spec(dep, TARGET_EPS, restarts=1, early_stop=False),
        xd,
        yd,
        idd,
        adaptive=True,
        what="diag-curve",
    )
    sweep = {
        f"{f:g}": _attack_cell(
            ctx,
            dep,
            _adaptive_spec(dep, TARGET_EPS, restarts=1, restart_step_factors=(f,)),
            xd,
            yd,
            idd,
            adaptive=True,
            what=f"diag-sweep-{f:g}",
        )["asr"]
        for f in SWEEP
    }
    unbounded = _attack_cell(
        ctx,
        dep,
        _adaptive_spec(dep, 1.0, steps=20, restarts=1),
        xd,
        yd,
        idd,
        adaptive=True,
        what="diag-unbounded",
    )
    main_sub = float(np.mean(main["success"][: len(xd)]))
    path = ctx.figure_path(f"robust-{dep.name}-loss-sweep.png")
    diag.plot_loss_and_sweep(
        path,
        curve_cell["loss_curve"],
        sweep,
        f"{dep.name}: adaptive attack at 4/255 ({len(xd)} images, {dep.eot} EOT)",
    )
    ctx.add_figure(
        path,
        f"{dep.name}: margin objective vs iteration (no early stop) and ASR vs step size, "
        "adaptive attack at eps 4/255.",
        FAMILY,
    )
    return {
        "n": len(xd),
        "main_asr_subset": main_sub,
        "long_asr": long["asr"],
        "sweep": sweep,
        "unbounded_asr": unbounded["asr"],
    }


THREAT_MODEL = (
    "Robustification threat model: a white-box attacker who knows the architecture, the "
    "weights, every preprocessing step and the defence's randomness (MedRDF's noise "
    "distribution and vote count, not the draws) and changes the pixels of the stored image "
    "within an L-inf ball, eps in [0,1] pixel units. Adaptive attack = the engine's PGD with "
    f"the margin loss, {STEPS} steps x {RESTARTS} restarts (alpha = f x eps / steps, f = "
    f"{', '.join(f'{f:g}' for f in STEP_FACTORS)} in turn: restarts attack only the failures; "
    "large steps beat a rugged loss surface where small ones stall), through "
    f"the whole deployed pipeline; MedRDF: EOT over {EOT_SAMPLES} noise draws with BPDA (soft "
    f"vote backward) around the vote, success re-predicted with the deployed vote {REPEATS} "
    "times (mean +- std). Images attacked per defence: the first "
    f"{N_CAP} (MedRDF {N_CAP // 2}) test images it classifies correctly."
)


def _assumed(module: Any) -> str:
    """The 'Assumed:' paragraph of a defence module's docstring (goes into the report)."""
    doc = module.__doc__ or ""
    part = doc[doc.find("Assumed:") :] if "Assumed:" in doc else ""
    return " ".join(part.split("\n\n")[0].split())


def _evaluate(ctx: StudyContext, dep: Deployed) -> list[dict[str, Any]]:
    if THREAT_MODEL not in ctx.notes.get(FAMILY, []):
        ctx.add_note(FAMILY, THREAT_MODEL)
    if dep.reseed is not None:
        dep.reseed(ctx.seed)
    clean = ctx.cell(
        {"defence": dep.name, "what": "clean", "train": _train_id(dep)},
        lambda: {"accuracy": ctx.clean_accuracy(dep.pipeline)},
    )["accuracy"]
    victim_clean = ctx.clean_accuracy(ctx.victim)
    if dep.reseed is not None:
        dep.reseed(ctx.seed)
    x, y, idx = ctx.attack_set(dep.pipeline, min(dep.n, ctx.profile.n_attack))
    n = len(x)
    rows: list[dict[str, Any]] = []
    base = {"defence": dep.name, "family": FAMILY, "n": n, "clean_accuracy": clean}

    # non-adaptive, as in the defence's paper
    non: dict[float, list[dict[str, Any]]] = {}
    gains: dict[str, float] = {}
    for spec in dep.paper_attacks:
        cell = _attack_cell(ctx, dep, spec, x, y, idx, adaptive=False, what="paper")
        ref = _reference_cell(ctx, spec, n, "paper")
        non.setdefault(spec.eps, []).append(cell)
        label = spec.name + (" (crafted on the undefended victim)" if dep.transfer else "")
        gains[f"{spec.name}@{spec.eps * 255:g}"] = ref["asr"] - cell["asr"]
        rows.append(
            make_row(
                **base,
                attack=label,
                adaptive=False,
                eps=spec.eps,
                attack_success_rate=cell["asr"],
                spec=spec,
                asr_std=cell["asr_std"],
                repeats=dep.repeats,
                undefended_asr=ref["asr"],
                robust_accuracy=clean * (1 - cell["asr"]),
                seconds=cell["seconds"],
                grad_norm_mean=cell["grad_norm_mean"],
                zero_grad_fraction=cell["zero_grad_fraction"],
            )
        )

    # adaptive, through the whole deployed pipeline
    curve: list[tuple[float, float]] = []
    victim_curve: list[tuple[float, float]] = []
    adaptive_cells: dict[float, dict[str, Any]] = {}
    victim_asr: dict[float, float] = {}
    for eps in ctx.profile.eps:
        spec = _adaptive_spec(dep, eps)
        cell = _attack_cell(ctx, dep, spec, x, y, idx, adaptive=True, what="adaptive")
        adaptive_cells[eps] = cell
        worst = np.any([cell["success"]] + [c["success"] for c in non.get(eps, [])], axis=0)
        worst_asr = float(worst.mean())
        ref = _reference_cell(
            ctx,
            AttackSpec(
                "adaptive-margin",
                eps,
                steps=STEPS,
                restarts=RESTARTS,
                restart_step_factors=STEP_FACTORS,
                loss="margin",
            ),
            n,
            "adaptive",
        )
        curve.append((eps * 255, clean * (1 - worst_asr)))
        victim_curve.append((eps * 255, victim_clean * (1 - ref["asr"])))
        victim_asr[eps] = ref["asr"]
        rows.append(
            make_row(
                **base,
                attack=spec.name,
                adaptive=True,
                eps=eps,
                attack_success_rate=cell["asr"],
                spec=spec,
                asr_std=cell["asr_std"],
                asr_runs=cell["asr_runs"],
                repeats=dep.repeats,
                eot_samples=dep.eot,
                bpda=dep.bpda,
                worst_case_asr=worst_asr,
                robust_accuracy=clean * (1 - worst_asr),
                undefended_asr=ref["asr"],
                seconds=cell["seconds"],
                grad_norm_mean=cell["grad_norm_mean"],
                zero_grad_fraction=cell["zero_grad_fraction"],
                nonfinite_grad_fraction=cell["nonfinite_grad_fraction"],
                **(
                    {
                        "kernel_saturation": {
                            "clean": cell["saturation_clean"],
                            "adversarial": cell["saturation_adversarial"],
                        }
                    }
                    if "saturation_clean" in cell
                    else {}
                ),
            )
        )

    _checks_and_notes(ctx, dep, clean, non, adaptive_cells, gains, curve, victim_asr)
    d = _diagnostics(
        ctx, dep, x, y, idx, adaptive_cells[min(ctx.profile.eps, key=lambda e: abs(e - TARGET_EPS))]
    )
    _diagnostic_checks(ctx, dep, d)
    _fixtures(ctx)
    _update_curves_figure(ctx, dep.name, curve, victim_curve)
    return rows


def _checks_and_notes(
    ctx: StudyContext,
    dep: Deployed,
    clean: float,
    non: dict[float, list[dict[str, Any]]],
    adaptive: dict[float, dict[str, Any]],
    gains: dict[str, float],
    curve: list[tuple[float, float]],
    victim_asr: dict[float, float],
) -> None:
    name = dep.name
    best_gain = max(gains.values()) if gains else 0.0
    best_at = max(gains, key=gains.get) if gains else "-"
    gained = best_gain >= GAIN_MIN
    rec = json.dumps({k: v for k, v in dep.train_record.items() if k != "config"}, default=str)
    ctx.add_note(
        FAMILY,
        f"{name}: trained with {json.dumps(dep.train_record.get('config'))} -> {rec}. "
        f"Clean test accuracy {clean:.3f}. "
        + " ".join(dep.assumptions)
        + " "
        + _assumed(dep.module),
    )
    ctx.add_note(
        FAMILY,
        f"{name}: non-adaptive evaluation "
        + (
            "(attacks crafted on the undefended victim, the defence-unaware attacker of the paper) "
            if dep.transfer
            else "(white-box on the defended model with CE, as in the paper) "
        )
        + (
            f"showed the claimed gain: ASR down by {best_gain:.3f} vs the undefended victim "
            f"at {best_at}/255."
            if gained
            else f"did NOT show the claimed gain (largest ASR drop vs the undefended victim "
            f"{best_gain:.3f} at {best_at}/255, below {GAIN_MIN})."
        ),
    )
    labels = np.asarray(ctx.data.test.labels)
    majority = float(np.bincount(labels).max() / len(labels))
    ctx.add_check(
        f"{name}: a working classifier (clean accuracy >= majority-class rate + 0.1)",
        clean >= majority + 0.1,
        f"clean accuracy {clean:.3f}, majority-class rate {majority:.3f}; below it the "
        "pipeline is (near) constant and a low ASR says nothing about robustness",
        defence=name,
    )
    eps4 = min(adaptive, key=lambda e: abs(e - TARGET_EPS))
    a4 = adaptive[eps4]
    if name != "pgd-at":
        ctx.add_check(
            f"{name}: adaptive ASR at 4/255 >= {TARGET_ASR:.0%} where a non-adaptive gain showed",
            (not gained) or a4["asr"] >= TARGET_ASR,
            f"non-adaptive gain {best_gain:.3f} ({'shown' if gained else 'not shown'}); "
            f"adaptive ASR {a4['asr']:.3f} +- {a4['asr_std']:.3f} over {dep.repeats} "
            f"evaluation(s); the same attack on the undefended victim: "
            f"{victim_asr[eps4]:.3f}",
            defence=name,
        )
    else:
        ctx.add_note(
            FAMILY,
            f"pgd-at (honest baseline): adaptive ASR at 4/255 {a4['asr']:.3f}, robust accuracy "
            f"{clean * (1 - a4['asr']):.3f}.",
        )
    e10 = _eps_at_10(curve)
    ctx.add_note(
        FAMILY,
        f"{name}: smallest eps at which robust accuracy falls to 10%: "
        + (
            f"{e10:g}/255."
            if e10 is not None
            else f"not reached up to {max(e for e, _ in curve):g}/255 "
            f"(robust accuracy {min(a for _, a in curve):.3f} there)."
        ),
    )
    eps_sorted = sorted(adaptive)
    asrs = [adaptive[e]["asr"] for e in eps_sorted]
    tol = 2 * max(adaptive[e]["asr_std"] for e in eps_sorted) + 0.02
    ctx.add_check(
        f"{name}: adaptive ASR non-decreasing in eps",
        all(b >= a - tol for a, b in itertools.pairwise(asrs)),
        "ASR "
        + ", ".join(f"{e * 255:g}/255: {a:.3f}" for e, a in zip(eps_sorted, asrs, strict=True)),
        defence=name,
    )
    worse = [(e, max(c["asr"] for c in non[e]), adaptive[e]["asr"]) for e in eps_sorted if e in non]
    ctx.add_check(
        f"{name}: adaptive >= non-adaptive at every eps",
        all(a >= m - tol for _, m, a in worse),
        "; ".join(f"{e * 255:g}/255: non-adaptive {m:.3f}, adaptive {a:.3f}" for e, m, a in worse),
        defence=name,
    )
    ctx.add_check(
        f"{name}: adaptive attack gradients finite and non-zero",
        a4["zero_grad_fraction"] == 0.0 and a4["nonfinite_grad_fraction"] == 0.0,
        f"at 4/255: mean input-gradient norm {a4['grad_norm_mean']:.3g}, zero fraction "
        f"{a4['zero_grad_fraction']:.3f}, non-finite {a4['nonfinite_grad_fraction']:.3f}"
        + (
            f"; kernel saturation clean {a4['saturation_clean']}, adversarial "
            f"{a4['saturation_adversarial']}"
            if "saturation_clean" in a4
            else ""
        ),
        defence=name,
    )


def _diagnostic_checks(ctx: StudyContext, dep: Deployed, d: dict[str, Any]) -> None:
    name = dep.name
    ctx.add_check(
        f"{name}: convergence (2x steps and 2x restarts change ASR by <= {TOLERANCE})",
        d["long_asr"] - d["main_asr_subset"] <= TOLERANCE,
        f"at 4/255 on {d['n']} images: {STEPS} steps x {RESTARTS} restarts ASR "
        f"{d['main_asr_subset']:.3f}, {2 * STEPS} x {2 * RESTARTS}: {d['long_asr']:.3f}",
        defence=name,
    )
    best = max(d["sweep"].values())
    ctx.add_check(
        f"{name}: step-size sweep (the attack, one restart per factor "
        f"{'/'.join(f'{f:g}' for f in STEP_FACTORS)}, within {TOLERANCE} of the best single "
        "factor)",
        d["main_asr_subset"] >= best - TOLERANCE,
        f"attack {d['main_asr_subset']:.3f}; one restart at step factor "
        + ", ".join(f"{k}: {v:.3f}" for k, v in d["sweep"].items()),
        defence=name,
    )
    ctx.add_check(
        f"{name}: unbounded attack (eps = 1) reaches 100%",
        d["unbounded_asr"] >= 0.99,
        f"ASR {d['unbounded_asr']:.3f}",
        defence=name,
    )


def _update_curves_figure(
    ctx: StudyContext,
    name: str,
    curve: list[tuple[float, float]],
    victim_curve: list[tuple[float, float]],
) -> None:
    """Store this defence's curve and redraw the one figure with every curve so far."""
    from medsec.utils import atomic_write_json

    store = ctx.artifact("robust/curves")
    store.mkdir(parents=True, exist_ok=True)
    atomic_write_json(store / f"{name}.json", [list(p) for p in curve])
    atomic_write_json(store / "none (undefended).json", [list(p) for p in victim_curve])
    curves = {p.stem: json.loads(p.read_text()) for p in sorted(store.glob("*.json"))}
    path = ctx.figure_path("robust-accuracy-vs-eps.png")
    diag.plot_robust_accuracy(path, curves, "adaptive attack: robust accuracy vs eps")
    rel = str(path.relative_to(ctx.out))
    if not any(f.path == rel for f in ctx.figures):
        ctx.add_figure(
            path,
            "Robust accuracy (clean accuracy x (1 - per-example worst-case ASR)) under the "
            "adaptive attack vs eps, every robustification defence and the undefended victim; "
            "dotted line: 10%.",
            FAMILY,
        )


BUILDERS: dict[str, tuple[Callable[[StudyContext], Deployed], str]] = {
    "ssat": (build_ssat, "semi-supervised adversarial training (Li, Pan & Zhu 2021)"),
    "kmm": (build_kmm, "kernelized manifold mapping layers (Taghanaki et al. 2019)"),
    "dae": (build_dae, "denoising auto-encoder CNN in front of the classifier (Xue et al. 2019)"),
    "medrdf": (build_medrdf, "MedRDF noisy copies + majority vote (Xu et al. 2021)"),
    "pgd-at": (build_pgd_at, "PGD adversarial training (Madry et al. 2018), honest baseline"),
}


DOCS: dict[str, Any] = {
    "ssat": ssat_module,
    "kmm": kmm_module,
    "dae": dae_module,
    "medrdf": medrdf_module,
    "pgd-at": pgd_at_module,
}


def _entry(
    name: str, build: Callable[[StudyContext], Deployed]
) -> Callable[[StudyContext], list[dict[str, Any]]]:
    def run(ctx: StudyContext) -> list[dict[str, Any]]:
        dep = build(ctx)
        dep.module = DOCS[name]
        return _evaluate(ctx, dep)

    run.__doc__ = f"Study entry ``{name}``: train (cached), non-adaptive, adaptive, diagnostics."
    return run


for _name, (_build, _summary_text) in BUILDERS.items():
    register_defence(_name, FAMILY, _summary_text)(_entry(_name, _build))
