"""PGD speed on one victim and one batch: medsec (fast and fp32) vs the fp32 floor vs libraries.

One run, same model, same batch (the first ``--batch`` test images it classifies correctly),
same attack (L-inf, eps, step alpha = 2.5 eps / steps, cross-entropy, NO random start, so
every implementation walks the same deterministic path). ``--model small-cnn``: trained on
``cxr-nodule`` 64 px (cached under ``.medsec-cache/attack_speed/``). ``--model resnet18``:
the published chest-X-ray size, 224 px (the 64 px test images upsampled), seeded weights left
untrained - training it here would take hours, and speed and the ASR agreement between
implementations do not need a trained model. Contenders:
- floor: ``steps`` x (forward + backward w.r.t. the input) in bare fp32 torch, nothing else;
- medsec fast: ``run_attack`` with ``early_stop=False`` and the default precision (``auto``:
  bf16 steps with channels-last input where the CPU runs bf16 natively; success in fp32);
- medsec fp32: the same with ``precision="fp32"`` (the same work as the libraries, plus the
  one re-prediction that decides success); the early-stop variant is printed as information;
- torchattacks ``PGD`` (images only; ``torchattacks+pred`` adds the re-prediction medsec
  does, as information); ART ``ProjectedGradientDescentPyTorch``.
Timing: medians of ``--repeats`` rounds, every method once per round, order rotated. The 2
cores are shared with other engineers, so by default torch runs 1 thread (with 2 threads on
busy cores OpenMP barriers stall: 5-8x slower, erratic) and the ratios use process CPU time
(user + system, so page faults count), which waiting for a core does not inflate; wall
times are printed too (``--clock wall`` uses them, ``--threads 2`` on an idle machine).
Every library's success is re-predicted with the model; the ASRs must agree within 2 points.
Last line: ``medsec_vs_floor=<r> medsec_vs_best_library=<r> medsec_fast_vs_best_library=<r>
asr_delta=<r>`` (fp32 path vs floor and libraries; fast path vs the faster library; the fast
path's |ASR - torchattacks' ASR| as a fraction). Targets: <= 1.10, <= 1, <= 0.67, <= 0.01.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from medsec.attacks import AttackSpec, run_attack
from medsec.data import load_dataset
from medsec.models import create_model
from medsec.models.architectures import Victim
from medsec.models.checkpoint import load_checkpoint, save_checkpoint
from medsec.models.training import TrainConfig, evaluate, train_victim

CACHE = Path(__file__).resolve().parent.parent / ".medsec-cache" / "attack_speed"
DATA = {"n_train": 2000, "n_val": 300, "n_test": 600, "seed": 0}
TRAIN = TrainConfig(arch="small-cnn", epochs=8, patience=3, seed=0)

AttackFn = Callable[[], Tensor]


def resnet18() -> tuple[nn.Module, dict[str, float], Tensor, Tensor]:
    """ResNet-18 at 224 px, seeded and untrained (see the module doc), on upsampled images."""
    data = load_dataset("cxr-nodule", size=64, cache_dir=CACHE, progress=False, **DATA)
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=1, num_classes=2, image_size=224).eval()
    x = torch.nn.functional.interpolate(
        torch.from_numpy(data.test.images), size=224, mode="bilinear", align_corners=False
    ).clamp(0, 1)
    y = torch.from_numpy(data.test.labels)
    with torch.no_grad():
        accuracy = float((model(x[:256]).argmax(1) == y[:256]).float().mean())
    return model, {"accuracy": accuracy, "auc": float("nan")}, x, y


def victim() -> tuple[Victim, dict[str, float], Tensor, Tensor]:
    """The trained victim (cached checkpoint, SHA-256 checked) and its test split."""
    data = load_dataset("cxr-nodule", size=64, cache_dir=CACHE, progress=False, **DATA)
    ckpt = CACHE / f"small-cnn-{data.content_hash[:16]}-e{TRAIN.epochs}-s{TRAIN.seed}.pt"
    if ckpt.exists():
        model, meta = load_checkpoint(ckpt, expect_data_hash=data.content_hash)
        metrics = meta["metrics"]
    else:
        model, metrics = train_victim(data, TRAIN, progress=False)
        metrics = {k: v for k, v in metrics.items() if k != "history"}
        save_checkpoint(ckpt, model, arch=TRAIN.arch, data_hash=data.content_hash,
                        image_size=64, metrics=metrics, settings=vars(TRAIN))  # fmt: skip
    test = evaluate(model, data.test, "cpu")
    x, y = torch.from_numpy(data.test.images), torch.from_numpy(data.test.labels)
    return model.eval(), test, x, y


def attack_batch(model: nn.Module, x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` test images the model classifies correctly (ASR is measured on them)."""
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    idx = ok.nonzero()[:, 0][:n]
    if len(idx) < n:
        raise SystemExit(f"only {len(idx)} correctly classified test images, need {n}")
    return x[idx].contiguous(), y[idx].contiguous()


def asr(model: nn.Module, x_adv: Tensor, y: Tensor, x: Tensor, eps: float) -> float:
    """Attack success rate re-predicted with the model (after checking the eps-ball, [0,1])."""
    dist = float((x_adv - x).abs().amax())
    if dist > eps * (1 + 1e-4) + 1e-6 or float(x_adv.min()) < 0 or float(x_adv.max()) > 1:
        raise AssertionError(f"adversarial images leave the eps-ball or [0,1] (L-inf {dist})")
    with torch.no_grad():
        return float((model(x_adv).argmax(1) != y).float().mean()) * 100


def methods(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int) -> dict[str, AttackFn]:
    """Each contender as a zero-argument callable returning the adversarial batch."""
    import torchattacks
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    alpha = 2.5 * eps / steps
    ce = nn.CrossEntropyLoss()

    def floor() -> Tensor:
        xa = x.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            torch.autograd.grad(ce(model(xa), y), xa)
            xa = xa.detach()
        return xa

    def medsec(early_stop: bool, precision: str = "auto") -> AttackFn:
        spec = AttackSpec("pgd-20", eps, steps=steps, step_size=alpha, random_start=False,
                          early_stop=early_stop, precision=precision)  # fmt: skip
        return lambda: run_attack(model, x, y, spec, batch_size=len(x)).x_adv

    ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)

    def ta_and_success() -> Tensor:  # the same deliverable as medsec: images AND success
        adv = ta(x, y)
        with torch.no_grad():
            model(adv).argmax(1).ne(y)
        return adv

    clf = PyTorchClassifier(model, loss=ce, input_shape=tuple(x.shape[1:]), nb_classes=2,
                            clip_values=(0.0, 1.0), device_type="cpu")  # fmt: skip
    art_pgd = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=alpha,
                                              max_iter=steps, num_random_init=0,
                                              batch_size=len(x), verbose=False)  # fmt: skip
    x_np, y_np = x.numpy(), y.numpy()
    return {
        "floor": floor,
        "medsec fast": medsec(False),
        "medsec fp32": medsec(False, "fp32"),
        "torchattacks": lambda: ta(x, y),
        "ART": lambda: torch.from_numpy(art_pgd.generate(x_np, y_np)),
        "medsec early-stop": medsec(True),
        "torchattacks+pred": ta_and_success,
    }


def timed(fns: dict[str, AttackFn], repeats: int) -> dict[str, dict[str, list[float]]]:
    """CPU and wall seconds per call; each round runs every method, order rotated per round."""
    out: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            c0, w0 = time.process_time(), time.perf_counter()
            fns[name]()
            out[name]["cpu"].append(time.process_time() - c0)
            out[name]["wall"].append(time.perf_counter() - w0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", choices=("small-cnn", "resnet18"), default="small-cnn")
    p.add_argument("--batch", type=int, default=None, help="default 128 (small-cnn), 16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eps", type=float, default=1.0, help="in /255 pixel units")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (see module docstring)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="which median the ratios use (both are printed)")  # fmt: skip
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("art").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, test, x_test, y_test = victim() if args.model == "small-cnn" else resnet18()
    batch = args.batch or (128 if args.model == "small-cnn" else 16)
    x, y = attack_batch(model, x_test, y_test, batch)
    eps = args.eps / 255
    print(f"victim {args.model} on cxr-nodule {x.shape[-1]}px: test accuracy "
          f"{test['accuracy']:.3f}, AUC {test['auc']:.3f} "
          f"(ready in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    print(f"batch {len(x)} x {tuple(x.shape[1:])}; PGD L-inf eps {args.eps}/255, {args.steps} "
          "steps, alpha 2.5*eps/steps, CE, no random start")  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of "
          f"{args.repeats} rotated rounds; ratios use {args.clock} time")  # fmt: skip
    fns = methods(model, x, y, eps, args.steps)
    adv = {name: fn() for name, fn in fns.items()}  # warm-up round, and the images for ASR
    times = timed(fns, args.repeats)
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    rates = {n: asr(model, a, y, x, eps) for n, a in adv.items() if n != "floor"}
    floor = med["floor"]
    print(f"{'method':<19}{'cpu s':>8}{'x floor':>9}{'wall s':>8}{'x floor':>9}{'ASR %':>8}")
    for n in fns:
        rate = f"{rates[n]:8.1f}" if n in rates else f"{'-':>8}"
        print(f"{n:<19}{med[n]['cpu']:8.3f}{med[n]['cpu'] / floor['cpu']:9.3f}"
              f"{med[n]['wall']:8.3f}{med[n]['wall'] / floor['wall']:9.3f}{rate}")  # fmt: skip
    compared = ("medsec fp32", "torchattacks", "ART")
    spread = max(rates[n] for n in compared) - min(rates[n] for n in compared)
    print(f"ASR spread (medsec fp32, torchattacks, ART): {spread:.1f} points (must be <= 2)")
    if spread > 2:
        raise AssertionError(f"ASRs disagree by {spread:.1f} points: {rates}")
    clock = args.clock
    best = min(med["torchattacks"][clock], med["ART"][clock])
    delta = abs(rates["medsec fast"] - rates["torchattacks"]) / 100
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    print(f"medsec_vs_floor={med['medsec fp32'][clock] / floor[clock]:.3f} "
          f"medsec_vs_best_library={med['medsec fp32'][clock] / best:.3f} "
          f"medsec_fast_vs_best_library={med['medsec fast'][clock] / best:.3f} "
          f"asr_delta={delta:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
