"""Load on the inference service over loopback TLS: throughput, latency, errors, audit, overhead.

One run, bounded in requests and seconds, stops by itself:
- builds a service directory with ``medsec serve init`` (small-cnn, 64x64, default policy and
  audit ``fsync = "always"`` unless --fsync never) and signs --images distinct test images;
- serves it twice in this process on 127.0.0.1 ports: the real service, and a baseline whose
  gate skips signature verification (same parsing, validation, model and audit);
- a separate client process (its own interpreter, so client work does not share the server's
  GIL) runs keep-alive HTTPS clients, one at a time (service time) and --concurrency at once
  (throughput); verified and plain phases alternate --rounds times, in ABBA order, so drift
  and going first or second hit both equally;
- counts audit lines against requests sent (warm-up included), and checks both chains.
Overhead = (mean verified latency - mean plain latency) / mean verified latency, per
concurrency level; ``verify_overhead`` on the last line is the larger of the two.
Last line: ``errors=<n> lost_audit=<n> p95_ms=<x> verify_overhead=<r>`` (targets 0, 0, -, <= 0.1).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import ssl
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from medsec.integrity import image_to_dicom, sign_dataset
from medsec.integrity.dicom_signature import dataset_bytes
from medsec.models import create_model, save_checkpoint
from medsec.service.app import ServiceState
from medsec.service.audit import verify_log
from medsec.service.bootstrap import init_service_dir
from medsec.service.config import load_config
from medsec.service.server import build_state, make_server

SIZE = 64


def run_phase(
    url: str, ca: str, token: str, bodies: list[bytes], n: int, concurrency: int, deadline: float
) -> list[tuple[float, int]]:
    """Client side (child process): ``n`` requests from ``concurrency`` threads; (ms, status)."""
    ctx = ssl.create_default_context(cafile=ca)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/dicom"}
    counter = iter(range(n))
    lock = threading.Lock()

    def worker(_: int) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        with httpx.Client(base_url=url, verify=ctx, timeout=30) as c:
            c.get("/healthz")  # handshake outside the measurement
            while time.time() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                t0 = time.perf_counter()
                try:
                    status = c.post("/v1/predict", content=bodies[i % len(bodies)], headers=headers)
                    code = status.status_code
                except httpx.HTTPError:
                    code = -1
                out.append(((time.perf_counter() - t0) * 1e3, code))
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        return [r for rs in pool.map(worker, range(concurrency)) for r in rs]


def _serve(state: ServiceState) -> tuple[str, object, threading.Thread]:
    server = make_server(state, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("server failed to start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"https://127.0.0.1:{port}", server, thread


def _stats(results: list[tuple[float, int]], seconds: float) -> dict[str, float]:
    lat = sorted(ms for ms, _ in results)
    return {
        "n": len(lat),
        "rps": len(lat) / seconds if seconds else 0.0,
        "mean": statistics.fmean(lat),
        "p50": lat[len(lat) // 2],
        "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        "errors": sum(code != 200 for _, code in results),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per phase per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating verified/plain rounds")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--images", type=int, default=16, help="distinct signed images")
    ap.add_argument("--fsync", choices=("always", "never"), default="always")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="hard stop for the run")
    args = ap.parse_args()
    deadline = time.time() + args.max_seconds
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=SIZE)
        save_checkpoint(root / "victim.pt", model, arch="small-cnn", data_hash="bench",
                        image_size=SIZE, metrics={}, settings={})  # fmt: skip
        init = init_service_dir(root / "svc", root / "victim.pt", port=0, client="bench")
        text = init.config.read_text().replace('fsync = "always"', f'fsync = "{args.fsync}"')
        text = text.replace("rate_per_s = 20", "rate_per_s = 1000000")
        init.config.write_text(text.replace("burst = 40", "burst = 1000000"))
        config = load_config(init.config)
        assert init.modality_key is not None and init.modality_cert is not None
        rng = np.random.default_rng(0)
        bodies = [
            dataset_bytes(
                sign_dataset(
                    image_to_dicom(rng.random((SIZE, SIZE), dtype=np.float32), seed=i),
                    init.modality_key,
                    init.modality_cert,
                )
            )
            for i in range(args.images)
        ]
        verified = build_state(config)
        plain = build_state(
            config.model_copy(
                update={
                    "audit": config.audit.model_copy(update={"path": root / "plain-audit.jsonl"})
                }
            ),
            verify_images=False,
        )
        servers = {name: _serve(st) for name, st in (("verified", verified), ("plain", plain))}
        ctx = mp.get_context("spawn")
        sent = {"verified": 0, "plain": 0}
        levels = sorted({1, args.concurrency})
        runs: dict[tuple[str, int], list[tuple[float, int]]] = {}
        seconds: dict[tuple[str, int], float] = {}
        cpu = {"verified": 0.0, "plain": 0.0}  # this process = the servers (clients are apart)
        with ctx.Pool(1) as pool:

            def phase(name: str, n: int, concurrency: int) -> list[tuple[float, int]]:
                job = (servers[name][0], str(init.ca_cert), init.token, bodies, n, concurrency,
                       deadline)  # fmt: skip
                out = pool.apply(run_phase, job)
                sent[name] += len(out)
                return out

            for name in sent:  # warm-up, not timed (imports, first calls, allocator)
                phase(name, 2 * args.concurrency, args.concurrency)
            for r in range(args.rounds):
                for level in levels:
                    # ABBA: the order flips every round, so going first or second (warm
                    # caches, a collector due) weighs on both phases alike
                    for name in ("verified", "plain")[:: 1 if r % 2 == 0 else -1]:
                        t0, c0 = time.perf_counter(), time.process_time()
                        out = phase(name, args.requests, level)
                        seconds[name, level] = seconds.get((name, level), 0.0) + (
                            time.perf_counter() - t0
                        )
                        cpu[name] += time.process_time() - c0
                        runs.setdefault((name, level), []).extend(out)
        for _, server, thread in servers.values():
            server.should_exit = True  # type: ignore[attr-defined]
            thread.join(timeout=20)
        audited = {"verified": verified.audit.lines, "plain": plain.audit.lines}
        chains_ok = all(verify_log(st.audit.path).ok for st in (verified, plain))
        verified.audit.close()
        plain.audit.close()

    print(f"loopback TLS, small-cnn {SIZE}x{SIZE}, audit fsync={args.fsync}, "
          f"{args.rounds} alternating rounds of {args.requests} requests per phase")  # fmt: skip
    overheads, errors = [], 0
    for level in levels:
        stats = {name: _stats(runs[name, level], seconds[name, level]) for name in sent}
        for name, st in stats.items():
            print(f"concurrency {level} {name:>8}: {st['n']:.0f} req, {st['rps']:.1f} req/s, "
                  f"mean {st['mean']:.2f} ms, p50 {st['p50']:.2f} ms, p95 {st['p95']:.2f} ms, "
                  f"errors {st['errors']:.0f}")  # fmt: skip
            errors += int(st["errors"])
        v, p = stats["verified"]["mean"], stats["plain"]["mean"]
        overheads.append((v - p) / v)
        print(f"concurrency {level} verification overhead: {v - p:.2f} ms = {overheads[-1]:.1%} "
              "of the verified request time")  # fmt: skip
    per_req = {n: cpu[n] * 1e3 / sum(len(runs[n, lv]) for lv in levels) for n in sent}
    cpu_share = (per_req["verified"] - per_req["plain"]) / per_req["verified"]
    print(f"server CPU per request: verified {per_req['verified']:.2f} ms, plain "
          f"{per_req['plain']:.2f} ms (verification {cpu_share:.1%} of it)")  # fmt: skip
    lost = sum(sent[n] - audited[n] for n in sent)
    print(f"audit lines {sum(audited.values())} for {sum(sent.values())} requests sent; "
          f"chains intact: {chains_ok}")  # fmt: skip
    p95 = _stats(runs["verified", levels[-1]], 1.0)["p95"]
    print(
        f"errors={errors} lost_audit={lost} p95_ms={p95:.2f} verify_overhead={max(overheads):.3f}"
    )
    return 0 if errors == 0 and lost == 0 and chains_ok else 1


if __name__ == "__main__":
    sys.exit(main())
