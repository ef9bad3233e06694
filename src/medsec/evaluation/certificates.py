"""The negative control: an L2 attack must not break a certified defence inside its radius.

A certified defence (``Deployed.certify``, e.g. randomized smoothing) states for each image a
prediction and an L2 radius within which that prediction cannot change. The check attacks
every certified-correct image twice with the project's L2 PGD (EOT over the defence's
randomness, margin loss, on the defence's attack view):

- inside: eps = ``inside`` x its radius (0.95): a confirmed adversarial example there is a
  violation of the certificate (an attack or certificate bug); 0 are expected.
- beyond: eps = ``beyond`` x its radius (4): confirmed adversarial examples are expected
  there, showing the attack works at all (an attack that never succeeds proves nothing).

Judging a randomised classifier without counting Monte Carlo noise as a violation: the
attack's own success flag (one noisy majority vote through the project's Criterion) is only
reported (``criterion_successes``). An image counts as adversarial only when CERTIFY, run
again on the attacked image with fresh noise, returns a class (not abstain) other than the
true (= certified) label. CERTIFY's class is the smoothed classifier's true prediction with
probability >= 1 - alpha, and the original certificate holds with probability >= 1 - alpha,
so Monte Carlo error yields a false violation with probability <= 2 alpha per image (0.002
at the defence's alpha = 0.001); a vote that merely wobbles near a tie abstains instead.
A violation is any confirmed adversarial example closer than its image's certified radius
(in either run); each run attacks images of one radius together (radii from n Monte Carlo
votes take few distinct values), so every image gets exactly its own eps.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from medsec.attacks import EOT, AttackSpec, Objective, logits_forward, margin, run_attack
from medsec.defences.base import Deployed
from medsec.errors import MedsecError

JUDGE_SEED = 104729  # offset of the judge's noise stream from the attack's


def _certify(dep: Deployed, x: Tensor, seed: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """(prediction, radius) for every image, in batches, the noise stream restarted at seed."""
    assert dep.certify is not None
    if dep.reseed is not None:
        dep.reseed(seed)
    out = [dep.certify(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
    if not out:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat([p.cpu() for p, _ in out]), torch.cat([r.cpu() for _, r in out])


def _attack(
    dep: Deployed,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    *,
    name: str,
    steps: int,
    eot: int,
    seed: int,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """L2 PGD on each image at its own eps (one run per distinct eps): (x_adv, Criterion
    success). The final iterate is kept (no early stop on a lucky noisy vote)."""
    view = dep.attack_view if dep.attack_view is not None else dep.pipeline

    def objective(labels: Tensor, idx: Tensor) -> Any:
        obj = Objective(logits_forward(view), [(1.0, margin())], labels)
        return EOT(obj, eot, batched=True) if eot > 1 else obj

    x_adv, success = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for e in torch.unique(eps):
        members = torch.nonzero(eps == e).flatten()
        spec = AttackSpec(name, float(e), norm="l2", steps=steps, eot_samples=eot, early_stop=False)
        if dep.reseed is not None:
            dep.reseed(seed)
        res = run_attack(
            dep.pipeline,
            x[members],
            y[members],
            spec,
            objective_factory=objective,
            batch_size=batch_size,
            seed=seed,
        )
        x_adv[members], success[members] = res.x_adv, res.success
    return x_adv, success


def _summary(values: Tensor) -> dict[str, float | None]:
    if len(values) == 0:
        return {"min": None, "median": None, "mean": None, "max": None}
    v = values.double()
    return {
        "min": float(v.min()),
        "median": float(v.median()),
        "mean": float(v.mean()),
        "max": float(v.max()),
    }


def certificate_check(
    dep: Deployed,
    x: Tensor,
    y: Tensor,
    *,
    steps: int = 20,
    eot: int = 8,
    seed: int = 0,
    batch_size: int = 250,
    inside: float = 0.95,
    beyond: float = 4.0,
) -> dict[str, Any]:
    """Certify ``x``, attack the certified-correct images inside and beyond their radius, and
    judge every attacked image by CERTIFY (see the module docstring). Indices refer to ``x``."""
    if dep.certify is None:
        raise MedsecError("certificate check: the defence declares no certify procedure")
    if not 0 < inside < 1 < beyond:
        raise MedsecError(f"certificate check: need 0 < inside < 1 < beyond: {inside}, {beyond}")
    start = time.perf_counter()
    x, y = x.cpu(), y.cpu()
    pred, radius = _certify(dep, x, seed, batch_size)
    ok = (pred == y) & (radius > 0)
    idx = torch.nonzero(ok).flatten()
    xs, ys, rs = x[idx], y[idx], radius[idx]
    out: dict[str, Any] = {
        "n": len(x),
        "abstained": int((pred == -1).sum()),
        "certified_correct": len(idx),
        "certified_accuracy": len(idx) / max(1, len(x)),
        "radius": _summary(rs),
        "settings": {"steps": steps, "eot": eot, "seed": seed, "inside": inside, "beyond": beyond},
    }
    for k, (name, factor) in enumerate((("inside", inside), ("beyond", beyond))):
        run_seed = seed + 1000 * (k + 1)
        x_adv, crit = _attack(
            dep,
            xs,
            ys,
            factor * rs,
            name=f"certificate-l2-{name}",
            steps=steps,
            eot=eot,
            seed=run_seed,
            batch_size=batch_size,
        )
        judged, _ = _certify(dep, x_adv, run_seed + JUDGE_SEED, batch_size)
        adversarial = (judged != -1) & (judged != ys)
        dist = (x_adv - xs).flatten(1).norm(dim=1)
        violation = adversarial & (dist < rs)
        out[name] = {
            "eps_over_radius": factor,
            "attacked": len(idx),
            "criterion_successes": int(crit.sum()),
            "adversarial": int(adversarial.sum()),
            "adversarial_rate": float(adversarial.float().mean()) if len(idx) else 0.0,
            "judge_abstained": int((judged == -1).sum()),
            "violations": int(violation.sum()),
            "violation_indices": idx[violation].tolist(),
            "min_adversarial_distance_over_radius": (
                float((dist[adversarial] / rs[adversarial]).min()) if adversarial.any() else None
            ),
        }
    out["violations"] = out["inside"]["violations"] + out["beyond"]["violations"]
    out["seconds"] = time.perf_counter() - start
    return out
