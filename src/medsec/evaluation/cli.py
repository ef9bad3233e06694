"""Verbs `data`, `train`, `attack`, `reproduce`, `grid`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medsec.cliargs import (
    device_name,
    non_negative_float,
    parse_eps,
    positive_int,
    seed_value,
)
from medsec.errors import MedsecError
from medsec.paths import check_output_file, claim_run_dir

DATA_HELP = (
    "data set: cxr-nodule | fundus-lesion (embedded: real anatomy, synthetic "
    "findings) | medmnist:FILE.npz | folder:DIR | dicom:LABELS.csv"
)


def _device(args: argparse.Namespace):
    from medsec.utils import resolve_device

    return resolve_device(args.device)


def _common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="auto (CUDA when present) | cpu | cuda[:N]",
    )
    if seed:
        p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_data(args: argparse.Namespace) -> int:
    from medsec.data import load_dataset

    out = (
        check_output_file(args.preview, suffixes=(".png",), what="preview")
        if args.preview
        else None
    )
    data = load_dataset(args.data, size=args.size, progress=not args.no_progress)
    print(json.dumps(data.summary(), indent=2))
    if out is not None:
        from medsec.evaluation.figures import plot_grid

        plot_grid(out, data.test.images[:16], data.test.labels[:16], data.class_names)
        print(f"preview written to {out}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from medsec.data import load_dataset
    from medsec.models import TrainConfig, save_checkpoint, train_victim

    out = check_output_file(args.out, force=args.force, what="checkpoint")
    data = load_dataset(args.data, size=args.size, seed=args.seed, progress=not args.no_progress)
    cfg = TrainConfig(arch=args.arch, epochs=args.epochs, seed=args.seed)
    model, metrics = train_victim(data, cfg, device=_device(args), progress=not args.no_progress)
    digest = save_checkpoint(
        out,
        model,
        arch=args.arch,
        data_hash=data.content_hash,
        image_size=data.size,
        metrics=metrics,
        settings=vars(cfg),
        input_contract=data.provenance.get("input"),
    )
    print(
        json.dumps(
            {
                "checkpoint": str(out),
                "sha256": digest,
                "clean_accuracy": metrics["clean_accuracy"],
                "clean_auc": metrics["clean_auc"],
                "best_epoch": metrics["best_epoch"],
            },
            indent=2,
        )
    )
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import io

    import numpy as np
    import torch

    from medsec.attacks import Criterion, preset, run_attack
    from medsec.data import load_dataset
    from medsec.models import load_checkpoint
    from medsec.utils import atomic_write_bytes

    out = None
    if args.out:  # written as NAME.npz, as numpy names it; the check is on that real path
        name = args.out if args.out.endswith(".npz") else f"{args.out}.npz"
        out = check_output_file(name, what="adversarial images")
    device = _device(args)
    model, meta = load_checkpoint(args.checkpoint, device=device)
    data = load_dataset(
        args.data, size=meta["image_size"], seed=args.seed, progress=not args.no_progress
    )
    if data.content_hash != meta["data_hash"]:
        print("medsec attack: warning: checkpoint was trained on other data", file=sys.stderr)
    split = data.split(args.split)
    x = torch.from_numpy(split.images[: args.n])
    y = torch.from_numpy(split.labels[: args.n])
    spec = preset(
        args.attack,
        args.eps,
        restarts=args.restarts,
        **({"steps": args.steps} if args.steps is not None else {}),
    )
    # as in the study: only images the model classifies correctly can be attack successes
    pred = torch.cat(
        [
            Criterion(model, y[s : s + 250]).predict(x[s : s + 250].to(device)).cpu()
            for s in range(0, len(x), 250)
        ]
    )
    correct = torch.nonzero(pred == y)[:, 0]
    if len(correct) == 0:
        raise MedsecError(f"the model classifies none of the {len(x)} images correctly")
    res = run_attack(model, x[correct], y[correct], spec, seed=args.seed)
    clean = len(correct) / len(x)
    asr = float(res.success.float().mean())
    if out is not None:
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            x_adv=res.x_adv.numpy(),
            labels=y[correct].numpy(),
            success=res.success.numpy(),
            indices=correct.numpy(),
        )
        atomic_write_bytes(out, buf.getvalue())
    print(
        json.dumps(
            {
                "attack": spec.record(),
                "n": len(x),
                "n_attacked": len(correct),
                "clean_accuracy": clean,
                "attack_success_rate": asr,
                "robust_accuracy": clean * (1 - asr),
                "seconds": res.seconds,
            },
            indent=2,
        )
    )
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from medsec.evaluation import executor as ex
    from medsec.evaluation.context import PROFILES
    from medsec.evaluation.grid import absolute

    base = Path.cwd()
    defences = ",".join(absolute(d.strip(), base) for d in args.defences.split(",") if d.strip())
    study = ex.Study(
        Path(args.out),
        absolute(args.dataset, base),
        defences or args.defences,
        args.arch,
        args.seed,
        PROFILES[args.profile],
    )
    _check_executor(args)
    study.entries()  # a typo is refused before the directory is claimed
    ex.claim_study_dir(study.out)
    if args.executor == "ray":
        (report,), tasks = ex.run_ray(
            [study],
            address=args.ray_address,
            cpus_per_task=args.cpus_per_task,
            gpus_per_task=args.gpus_per_task,
            progress=not args.no_progress,
        )
        print(ex.format_summary(ex.worker_summary(tasks)), file=sys.stderr)
    else:
        (report,) = ex.run_serial([study], _device(args), not args.no_progress)
    print(f"report: {report} (also report.html, metrics.json, metrics.csv, figures/)")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from medsec.evaluation.grid import GRID_MARKER, load_config, run_grid

    _check_executor(args)
    cfg = load_config(Path(args.config))
    out = claim_run_dir(args.out, GRID_MARKER, record={"format": "medsec-grid/1"})
    report = run_grid(
        cfg,
        out,
        executor=args.executor,
        address=args.ray_address,
        cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task,
        device=_device(args),
        progress=not args.no_progress,
    )
    print(f"grid report: {report} (also grid.json; each study's report in its folder)")
    return 0


def _check_executor(args: argparse.Namespace) -> None:
    """Options of the other executor are refused, never silently ignored."""
    if args.executor != "ray":
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("ray_address", "cpus_per_task")
            if getattr(args, name) is not None
        ] + (["--gpus-per-task"] if args.gpus_per_task else [])
        if given:
            raise MedsecError(f"{', '.join(given)}: only with --executor ray")
    elif args.device != "auto":
        raise MedsecError(
            "with --executor ray each task's device is CPU, or CUDA when --gpus-per-task > 0; "
            "--device does not apply"
        )


def _executor_options(p: argparse.ArgumentParser) -> None:
    from medsec.evaluation.executor import EXECUTORS

    p.add_argument(
        "--executor",
        default="serial",
        choices=EXECUTORS,
        help="serial: this process (default); ray: Ray tasks, local or on a cluster",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="a running Ray cluster (e.g. HEAD:6379 or 'auto'); default: a local Ray instance",
    )
    p.add_argument(
        "--cpus-per-task",
        type=positive_int,
        help="CPUs (= torch threads) of each Ray task; default: this machine's torch threads, "
        "which gives the serial run's results bit for bit (fewer: more tasks at once, "
        "results equal up to float rounding in training)",
    )
    p.add_argument(
        "--gpus-per-task",
        type=non_negative_float,
        default=0.0,
        help="GPUs of each Ray task (0: CPU only; a fraction shares a GPU)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    from medsec.attacks import PRESETS
    from medsec.evaluation.context import PROFILES
    from medsec.models import list_models

    p = sub.add_parser("data", help="describe (and preview) a data set")
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--size", type=int, default=64, choices=(28, 64, 128, 224))
    p.add_argument("--preview", metavar="PNG", help="write a grid of test images to PNG")
    _common(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a victim model and write a verified checkpoint")
    p.add_argument("--data", default="fundus-lesion", help=DATA_HELP)
    p.add_argument("--arch", default="small-cnn", choices=list_models())
    p.add_argument("--size", type=int, default=64, choices=(28, 64, 128, 224))
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("attack", help="attack a checkpoint on a data split, print the ASR")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="fundus-lesion", help=DATA_HELP)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--attack", default="pgd-20", choices=list(PRESETS))
    p.add_argument(
        "--eps",
        type=parse_eps,
        default=4 / 255,
        help="L-inf/L2 budget in [0,1] pixel units; '4/255' accepted",
    )
    p.add_argument("--steps", type=positive_int, help="override the preset's steps")
    p.add_argument("--restarts", type=positive_int, default=1)
    p.add_argument("--n", type=positive_int, default=500, help="number of images to attack")
    p.add_argument("--out", help="write adversarial images to this .npz (never replaced)")
    _common(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser(
        "reproduce",
        help="run the whole study and write the report",
        description="Train the victim, evaluate each defence non-adaptively "
        "and adaptively, pass every adversarial image through the signature "
        "gate, and write report.md/.html, metrics.json/.csv and figures. "
        "Rerunning continues where a killed run stopped.",
    )
    p.add_argument("--profile", default="full", choices=tuple(PROFILES))
    p.add_argument("--dataset", default="fundus-lesion", help=DATA_HELP)
    p.add_argument(
        "--defences",
        default="all",
        help="comma list of defences (none, ssat, ma-kd-bu, ..., signature-gate) or 'all'; "
        "your own: path/to/file.py:NAME or package.module:NAME (a medsec.defences.Defence)",
    )
    p.add_argument("--arch", default="small-cnn", choices=list_models())
    p.add_argument("--out", default="results", help="output directory (default: results)")
    _executor_options(p)
    _common(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "grid",
        help="one study per data set x architecture x seed, then a combined report",
        description="Run the study for every combination in a TOML config (profile, "
        "datasets, archs, defences, seeds), each in its own folder under --out, then write "
        "grid.md/grid.json: verdicts and adaptive ASRs with intervals across them. "
        "Rerunning continues where a killed run stopped.",
    )
    p.add_argument("--config", required=True, help="grid.toml")
    p.add_argument("--out", required=True, help="output directory of the grid")
    _executor_options(p)
    _common(p, seed=False)  # the seeds are the config's
    p.set_defaults(func=cmd_grid)
