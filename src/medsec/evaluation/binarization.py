"""The binarization test (Zimmermann, Brendel, Tramer & Carlini 2022, "Increasing Confidence
in Adversarial Robustness Evaluations"): an attack unit test for any deployed defence.

Per test image x (label y) the defended classifier's last linear layer is replaced by a
binary readout on that layer's input features, fitted so that x and ``n_inner`` random
points inside the L-inf ball (uniform in ``[-0.95 eps, 0.95 eps]``, the paper's 5% gap) keep
label y while one point on the ball's surface (the target) gets another label. The modified
model therefore HAS an adversarial example inside the ball, and any attack worth trusting
must find one. As in the authors' code, the readout is a logistic regression, its bias is
moved until the target is only just adversarial (``CLOSENESS``), and its scores are rescaled
to the range of the classifier's own logits (so loss-scale habits of the attack still fit).

The readout is a forward hook on the shared layer, so the deployed pipeline, its
preprocess, its detector and the attacker's view (BPDA/EOT, when it holds the same
classifier) all see the modified model; the hook is removed on exit, errors included.
Feasibility (else the image is skipped and counted): the modified deployed pipeline keeps x
and the inner points at y and decides the target a success by the one Criterion (the
detector, if any, not flagging it). The paper's setting is one surface point
(``n_boundary=1``); more are tried in turn as fallback targets, as the authors' code
resamples points a detector rejects, and then, for a deterministic pipeline, the ball's two
corners x +- eps (where the features are few or smooth, e.g. a matched filter's global
maximum, only an extreme point can be separated from the inner points; for a vote each
extra target costs ``TARGET_DRAWS`` passes, +40% on the tiny study's test, so it is not tried).

Where the head runs on several noisy copies per image (a vote, e.g. MedRDF) the readout is
fitted on every copy's features and the target is drawn ``TARGET_DRAWS`` times. A detector
that reads the classifier's logits sees the readout too (the modified model is the whole
model). An attacker's view that holds a COPY of the classifier does not: it then fails the
test, which is the right verdict for an attack aimed at a different model.
Pass = the attack's output lies in the ball and is a success by the Criterion; the paper
calls an attack trustworthy at a pass rate >= 0.95 (``PASS_RATE``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from medsec.attacks.criteria import Criterion, eval_mode
from medsec.defences.base import Deployed
from medsec.errors import MedsecError

INNER_GAP = 0.05  # inner points lie within (1 - gap) * eps, as in the authors' code
CLOSENESS = 0.999  # readout bias moved so the target keeps 0.1% of its score
# A head that runs on noisy copies (a vote) needs a readout that holds on fresh noise: the
# target's features are drawn TARGET_DRAWS times and its bias moved only half-way (measured
# on MedRDF: at 0.999 the target keeps ~50% of the vote and every image is infeasible; at
# 0 clean points flip).
TARGET_DRAWS = 40
RANDOM_CLOSENESS = 0.5
PASS_RATE = 0.95  # the paper's threshold for a trustworthy attack
# Stop after this many images when none was feasible: where the test cannot be built (MedRDF
# at 1/255: noise of 12.75/255 per pixel drowns the 1/255 ball; every target, corners
# included, infeasible) the other images only cost time (4 min of a full run).
GIVE_UP_AFTER = 5
TOL = 1e-6  # float slack on the L-inf budget


def last_linear(dep: Deployed, x: Tensor) -> nn.Linear:
    """The ``nn.Linear`` of ``dep.classifier`` that runs last on a forward pass of ``x``."""
    order: list[nn.Linear] = []
    linears = [m for m in dep.classifier.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in linears]
    try:
        with torch.no_grad(), eval_mode(dep.pipeline):
            dep.pipeline(x[:1].to(_device(dep)))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise MedsecError(
            "binarization test: the defended classifier has no nn.Linear layer on its "
            "forward path to replace with a binary readout"
        )
    return order[-1]


def _device(dep: Deployed) -> torch.device:
    return next(iter(dep.pipeline.parameters()), torch.empty(0)).device


class _Readout:
    """Forward hook: records the layer's inputs and outputs, or (once ``w`` is set) replaces
    its output with logits where class ``label`` wins iff the readout score is below 0."""

    def __init__(self) -> None:
        self.records: list[tuple[Tensor, Tensor]] = []
        self.w: Tensor | None = None
        self.b = 0.0
        self.label = 0
        self.other = 1

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Any:
        feats = inputs[0]
        if self.w is None:
            if feats.ndim != 2:
                raise MedsecError(
                    f"binarization test: the last linear layer takes {feats.ndim}-d input; "
                    "only (batch, features) is supported"
                )
            self.records.append((feats.detach(), out.detach()))
            return None
        # any leading dims (e.g. a detector's Monte-Carlo dropout passes, (T, B, features))
        r = (feats @ self.w.to(feats) + self.b)[..., None]  # > 0: the adversarial side
        if out.shape[-1] == 1:  # one logit for class 1 (as_two_logits lifts it to [0, z])
            return r if self.label == 0 else -r
        cols = torch.arange(out.shape[-1], device=r.device)
        low = -r.abs() / 2 - 1  # every other class stays below both
        return torch.where(cols == self.label, -r / 2, torch.where(cols == self.other, r / 2, low))


@contextlib.contextmanager
def binarized(layer: nn.Linear) -> Iterator[_Readout]:
    """Hook a readout on ``layer`` for the duration of the block (removed on any exit)."""
    hook = _Readout()
    handle = layer.register_forward_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()


def _inner(x: Tensor, n: int, eps: float, gen: torch.Generator) -> Tensor:
    u = torch.rand((n, *x.shape[1:]), generator=gen).to(x)
    return (x + (2 * u - 1) * eps * (1 - INNER_GAP)).clamp(0, 1)


def _surface(x: Tensor, n: int, eps: float, gen: torch.Generator) -> Tensor:
    """Points at L-inf distance exactly eps from x inside [0, 1]: a uniform draw in the
    ball whose largest coordinate is pushed to +-eps (to the side that stays in [0, 1])."""
    u = (2 * torch.rand((n, *x.shape[1:]), generator=gen) - 1).to(x).flatten(1)
    x0 = x.flatten(1).expand_as(u)
    j = u.abs().argmax(1, keepdim=True)
    sign = u.gather(1, j).sign()
    fits = (x0.gather(1, j) + sign * eps <= 1) & (x0.gather(1, j) + sign * eps >= 0)
    u = u.scatter(1, j, torch.where(fits, sign, -sign))
    return (x0 + u * eps).clamp(0, 1).view(n, *x.shape[1:])


def _corners(x: Tensor, eps: float) -> Tensor:
    """The two fallback targets: x shifted by +eps and by -eps everywhere (clamped). A random
    surface point moves a low-dimensional or smoothing feature (a global maximum, a mean) no
    further than the inner points do, so no readout can separate it; the corners move such a
    feature the furthest any point of the ball can."""
    return torch.cat([(x + eps).clamp(0, 1), (x - eps).clamp(0, 1)])


def _features(dep: Deployed, hook: _Readout, pts: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(features, original logits) at the hooked layer for ``pts`` through the pipeline: one
    row per image, or several where the pipeline runs its head on noisy copies (a vote)."""
    hook.records.clear()
    if dep.reseed is not None:
        dep.reseed(seed)
    with torch.no_grad(), eval_mode(dep.pipeline):
        for s in range(0, len(pts), 500):
            dep.pipeline(pts[s : s + 500])
    feats, outs = (torch.cat(t) for t in zip(*hook.records, strict=True))
    hook.records.clear()
    if len(feats) % len(pts):
        raise MedsecError(
            "binarization test: the classifier's last linear layer ran on "
            f"{len(feats)} rows for {len(pts)} images, not a whole number of rows per image"
        )
    return feats, outs


def _fit(clean: Tensor, target: Tensor, logits: Tensor, closeness: float) -> tuple[Tensor, float]:
    """Readout (w, b): score < 0 on the clean rows, > 0 on the target's row(s).

    scikit-learn's logistic regression as in the authors' code; a large finite C keeps it
    nearly unpenalised while still converging on separable data (unpenalised weights
    diverge); balanced class weights because one target faces ~1000 clean points. The
    bias then leaves the target's (median) row with 1 - closeness of its score.
    """
    f = torch.cat([clean, target]).double().cpu().numpy()
    mu, sd = f.mean(0), f.std(0) + 1e-8
    labels = np.zeros(len(f), dtype=np.int64)
    labels[len(clean) :] = 1
    lr = LogisticRegression(C=1e4, class_weight="balanced", max_iter=2000)
    lr.fit((f - mu) / sd, labels)
    w = lr.coef_[0] / sd
    b = float(lr.intercept_[0] - w @ mu)
    r = f @ w + b
    top = float(np.median(r[len(clean) :]))
    b -= closeness * top if top > 0 else 0.0
    r = f @ w + b
    span = float(r.max() - r.min())
    scale = float(logits.max() - logits.min()) / span if span > 0 else 1.0
    scale = scale if scale > 0 else 1.0
    return torch.from_numpy(w * scale).float(), b * scale


def _decide(dep: Deployed, x: Tensor, y: Tensor, detector: Any, seed: int) -> Tensor:
    """Per-row success by the one Criterion: for random pipelines the majority of
    ``dep.repeats`` calls, drawn sequentially (a row is called again only while its majority
    is open: 3 calls instead of 5 for MedRDF's clean inner points)."""
    if dep.reseed is not None:
        dep.reseed(seed)
    out = [
        Criterion(dep.pipeline, y[s : s + 250], detector=detector, repeats=dep.repeats)(
            x[s : s + 250]
        ).cpu()
        for s in range(0, len(x), 250)
    ]
    return torch.cat(out)


def _set_up(
    dep: Deployed,
    hook: _Readout,
    clean: Tensor,
    targets: Tensor,
    y: Tensor,
    detector: Any,
    seed: int,
) -> bool:
    """Fit the readout for one image (``clean[0]``) on the first feasible target; False if
    none is (the readout is then left in place, but that image is not attacked)."""
    hook.w = None
    f_clean, logits = _features(dep, hook, clean, seed)
    hook.label = int(y)
    hook.other = 1 - hook.label if logits.shape[1] <= 2 else _runner_up(logits[0], y)
    draws = 1 if len(f_clean) == len(clean) else TARGET_DRAWS
    closeness = CLOSENESS if draws == 1 else RANDOM_CLOSENESS
    for j in range(len(targets)):
        hook.w = None
        f_target, _ = _features(
            dep, hook, targets[j : j + 1].expand(draws, *targets.shape[1:]), seed
        )
        hook.w, hook.b = _fit(f_clean, f_target, logits, closeness)
        stays = ~_decide(dep, clean, y.expand(len(clean)), None, seed)
        if bool(stays.all()) and bool(_decide(dep, targets[j : j + 1], y, detector, seed).all()):
            return True
    return False


def binarization_test(
    dep: Deployed,
    x: Tensor,
    y: Tensor,
    eps: float,
    attack: Callable[[Tensor, Tensor], Tensor],
    *,
    n_inner: int = 999,
    n_boundary: int = 1,
    seed: int = 0,
    detector: Any = None,
) -> dict[str, Any]:
    """Run the test on each image of ``x`` (labels ``y``, correctly classified) with
    ``attack(x, y) -> x_adv``, the defence's own adaptive attack on the deployed pipeline.

    Stops after ``GIVE_UP_AFTER`` images if none of them was feasible.
    Returns ``n_images``, ``n_tested`` (feasible images attacked), ``n_infeasible``,
    ``n_not_tried`` (images left after giving up),
    ``pass_rate`` (passes / n_tested; None when nothing was feasible), ``passed`` (per image:
    True/False, None where infeasible), ``passed_threshold`` (rate >= PASS_RATE; None when
    nothing was feasible) and ``settings``.
    ``detector`` defaults to ``dep.detector``.
    """
    if not (0 < eps <= 0.5):
        raise MedsecError(f"binarization test: eps must be in (0, 0.5], got {eps}")
    if n_inner < 1 or n_boundary < 1:
        raise MedsecError("binarization test: n_inner and n_boundary must both be >= 1")
    if len(x) != len(y) or len(x) == 0:
        raise MedsecError("binarization test: x and y must be non-empty and of equal length")
    detector = dep.detector if detector is None else detector
    device = _device(dep)
    layer = last_linear(dep, x)
    gen = torch.Generator().manual_seed(seed)
    passed: list[bool | None] = []
    with binarized(layer) as hook:
        for i in range(len(x)):
            if i == GIVE_UP_AFTER and all(p is None for p in passed):
                break
            xi, yi = x[i : i + 1].to(device), y[i : i + 1].to(device)
            clean = torch.cat([xi, _inner(xi, n_inner, eps, gen)])
            targets = _surface(xi, n_boundary, eps, gen)
            if dep.repeats == 1:  # a vote's readout costs TARGET_DRAWS passes per target
                targets = torch.cat([targets, _corners(xi, eps)])
            if not _set_up(dep, hook, clean, targets, yi, detector, seed):
                passed.append(None)
                continue
            if dep.reseed is not None:
                dep.reseed(seed)
            x_adv = attack(xi, yi).to(device)
            inside = float((x_adv - xi).abs().max()) <= eps + TOL
            inside = inside and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
            passed.append(inside and bool(_decide(dep, x_adv, yi, detector, seed).all()))
    tested = [p for p in passed if p is not None]
    rate = sum(tested) / len(tested) if tested else None
    return {
        "n_images": len(x),
        "n_tested": len(tested),
        "n_infeasible": len(passed) - len(tested),
        "n_not_tried": len(x) - len(passed),
        "pass_rate": rate,
        "passed_threshold": None if rate is None else rate >= PASS_RATE,
        "passed": passed,
        "settings": {
            "n_inner": n_inner,
            "n_boundary": n_boundary,
            "fallback_targets": "x + eps and x - eps (clamped to [0, 1]), deterministic only",
            "eps": eps,
            "seed": seed,
            "inner_gap": INNER_GAP,
            "closeness": CLOSENESS,
            "closeness_randomised": RANDOM_CLOSENESS,
            "target_draws_randomised": TARGET_DRAWS,
            "threshold": PASS_RATE,
            "give_up_after": GIVE_UP_AFTER,
        },
    }


def _runner_up(logits: Tensor, y: Tensor) -> int:
    """The class other than y with the largest original logit at x (the natural target)."""
    z = logits.clone()
    z[int(y)] = -torch.inf
    return int(z.argmax())
