"""APGD vs the study's adaptive PGD schedule, at equal gradient budget, on one defended model.

Does APGD (Croce & Hein 2020: step 2 eps halved at checkpoints, momentum) deserve to be the
default adaptive optimiser? It must be at least as strong as the schedule it would replace:
margin-loss PGD, ``steps`` x 3 restarts with step factors 2.5 / 10 / 50 (alpha = f eps /
steps). Same images (the first ``--n`` test images the pipeline classifies correctly), same
loss, same number of gradient steps, early stop on; printed per eps: ASR with its 95%
interval for each, the per-image disagreement, and CPU seconds.

Needs a finished study directory (``medsec reproduce --profile quick --out DIR``) whose
artefacts hold the victim and the defence (no training happens here):
    python benchmarks/apgd_vs_pgd.py --study DIR --defence pgd-at
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medsec.attacks import AttackSpec, run_attack
from medsec.cache import ArtifactStore
from medsec.defences import get_defence
from medsec.defences.base import BuildEnv
from medsec.evaluation.context import PROFILES, StudyContext, clopper_pearson
from medsec.evaluation.study import load_study_data, prepare_victim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--defence", default="pgd-at")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eps", default="1,2,4", help="comma list, x/255")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    device = torch.device("cpu")
    data = load_study_data("fundus-lesion", profile, 0, False)
    victim, meta = prepare_victim(args.study, data, profile, "small-cnn", 0, device, False)
    ctx = StudyContext(args.study, profile, data, victim, meta, device, 0, False)
    tag = f"{data.content_hash[:10]}-{meta.get('sha256', '')[:10]}"
    env = BuildEnv(
        profile.eps, 0, device, profile.batch_size, ArtifactStore(args.study / "artifacts", tag)
    )
    dep = get_defence(args.defence).build(victim, data, env)
    x, y, _ = ctx.attack_set(dep.pipeline, args.n)
    print(f"{args.defence}: {len(x)} images, {args.steps} steps x 3 restarts each")
    for e in (float(v) / 255 for v in args.eps.split(",")):
        specs = {
            "pgd (2.5/10/50)": AttackSpec(
                "pgd",
                e,
                steps=args.steps,
                restarts=3,
                loss="margin",
                restart_step_factors=(2.5, 10.0, 50.0),
            ),
            "apgd": AttackSpec(
                "apgd", e, steps=args.steps, restarts=3, loss="margin", step_rule="apgd"
            ),
        }
        got = {}
        for name, spec in specs.items():
            t0 = time.process_time()
            res = run_attack(dep.pipeline, x, y, spec, batch_size=profile.batch_size, seed=0)
            k = int(res.success.sum())
            lo, hi = clopper_pearson(k, len(x))
            got[name] = res.success
            print(
                f"  eps {e * 255:g}/255 {name:16s} ASR {k / len(x):.3f} [{lo:.3f}, {hi:.3f}]"
                f"  cpu {time.process_time() - t0:6.1f} s"
            )
        a, b = got.values()
        only = (int((a & ~b).sum()), int((b & ~a).sum()))
        print(f"  eps {e * 255:g}/255 images only pgd fooled: {only[0]}, only apgd: {only[1]}")


if __name__ == "__main__":
    main()
