"""The service under the attacks of issue 16, measured on a real `medsec serve` process.

1. Deflate bombs: ``--bombs`` uploads (default 40, one token's burst) of a ~1 MB Deflated DICOM
   that would inflate to ``--bomb-mb`` (default 1024) MB; the server's resident memory is
   sampled throughout (target: peak within +100 MB of its idle size).
2. Slow clients: ``--slow`` connections that never start TLS, as many that send half a request
   header and stop, a slow body, and clients that hang up mid-body; reports how long the server
   held them, how many audit entries are status 500 (target 0) and how many tracebacks reached
   its log (target 0).

Run: ``python benchmarks/service_attack.py`` (about a minute; loopback only).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medsec.integrity import image_to_dicom
from medsec.models import create_model, save_checkpoint
from medsec.service.bootstrap import init_service_dir


def bomb(inflated: int) -> bytes:
    """A well-formed Deflated DICOM file whose dataset inflates to ``inflated`` bytes."""
    ds = image_to_dicom(np.zeros((8, 8), np.float32))
    del ds.PixelData
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    zeros = inflated - len(body.getvalue()) - 12
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [head.getvalue(), deflate.compress(body.getvalue())]
    out.append(deflate.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, zeros)))
    chunk = bytes(1 << 20)
    for start in range(0, zeros, len(chunk)):
        out.append(deflate.compress(chunk[: zeros - start]))
    out.append(deflate.flush())
    return b"".join(out)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found")


def tls(port: int, ca: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    return ca.wrap_socket(raw, server_hostname="127.0.0.1")


def held(socks: list[tuple[socket.socket, float]], limit: float = 120) -> list[float]:
    """For each (socket, opened at), seconds until the server closed it (watched together)."""
    sel = selectors.DefaultSelector()
    for sock, opened in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, opened)
    times, deadline = [], time.monotonic() + limit
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            sock = key.fileobj
            try:
                if sock.recv(65536):  # type: ignore[union-attr]
                    continue
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except (ssl.SSLError, OSError):
                pass
            times.append(time.monotonic() - key.data)
            sel.unregister(sock)
    times += [float("inf")] * len(sel.get_map())
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bombs", type=int, default=40)
    ap.add_argument("--bomb-mb", type=int, default=1024)
    ap.add_argument("--slow", type=int, default=500, help="connections holding half a header")
    ap.add_argument("--hangups", type=int, default=65, help="clients hanging up mid-body")
    args = ap.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="medsec-attack-"))
    model = create_model("small-cnn", in_channels=1, num_classes=2, image_size=64)
    save_checkpoint(root / "victim.pt", model, arch="small-cnn", data_hash="bench",
                    image_size=64, metrics={}, settings={})  # fmt: skip
    init = init_service_dir(root / "svc", root / "victim.pt", port=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = init.config.read_text().replace("port = 0", f"port = {port}")
    init.config.write_text(text.replace("burst = 40", f"burst = {max(40, args.bombs + 1)}"))
    log = root / "server.log"
    cmd = [sys.executable, "-m", "medsec.cli", "serve", "--config", str(init.config)]
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    ca = ssl.create_default_context(cafile=str(init.ca_cert))
    url = f"https://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/healthz", verify=ca, timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        payload = bomb(args.bomb_mb << 20)
        idle = rss_mb(server.pid)
        print(f"bomb: {len(payload)} bytes on the wire, inflates to {args.bomb_mb} MB")
        peak, done = idle, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(server.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        headers = {"Authorization": f"Bearer {init.token}", "Content-Type": "application/dicom"}
        statuses: list[int] = []

        def send(n: int) -> None:
            with httpx.Client(base_url=url, verify=ca, timeout=120) as c:
                for _ in range(n):
                    statuses.append(
                        c.post("/v1/predict", content=payload, headers=headers).status_code
                    )

        threads = [threading.Thread(target=send, args=(args.bombs // 8,)) for _ in range(8)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started
        done.set()
        sampler.join()
        counts = {code: statuses.count(code) for code in sorted(set(statuses))}
        print(f"bombs: {len(statuses)} sent in {took:.1f} s, statuses {counts}")
        print(f"server RSS: idle {idle:.0f} MB, peak {peak:.0f} MB (+{peak - idle:.0f} MB), "
              f"after {rss_mb(server.pid):.0f} MB")  # fmt: skip

        # mute clients: TCP connections that never start the TLS handshake
        mute = [(socket.create_connection(("127.0.0.1", port)), time.monotonic())
                for _ in range(args.slow)]  # fmt: skip
        times = sorted(held(mute))
        for s, _ in mute:
            s.close()
        print(f"no TLS handshake: {len(times)} connections, closed after {times[0]:.1f} to "
              f"{times[-1]:.1f} s")  # fmt: skip
        # slow headers: hold half a request line each
        socks = []
        for _ in range(args.slow):
            s = tls(port, ca)
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
            socks.append((s, time.monotonic()))
        times = sorted(held(socks))
        for s, _ in socks:
            s.close()
        quick = sum(t < 1 for t in times)
        print(f"slow headers: {len(times)} connections; {quick} refused at once (connection "
              f"cap reached), the rest closed by the header timeout; longest held "
              f"{times[-1]:.1f} s")  # fmt: skip
        # slow bodies and hang-ups
        request = (
            "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
            f"Authorization: Bearer {init.token}\r\nContent-Length: 100000\r\n\r\n"
        )
        slow = tls(port, ca)
        slow.sendall(request.encode() + b"\0" * 1000)
        started = time.monotonic()
        reply = slow.recv(200)
        print(f"slow body: answered {reply.split(b' ')[1].decode()} after "
              f"{time.monotonic() - started:.1f} s")  # fmt: skip
        slow.close()
        for _ in range(args.hangups):
            with tls(port, ca) as s:
                s.sendall(request.encode() + b"\0" * 1000)
        time.sleep(2)
    finally:
        server.terminate()
        server.wait(timeout=60)
    entries = [
        json.loads(x) for x in (root / "svc" / "audit" / "audit.jsonl").read_text().splitlines()
    ]
    by_status: dict[int, int] = {}
    for e in entries:
        by_status[e["status"]] = by_status.get(e["status"], 0) + 1
    text = log.read_text(errors="replace")
    print(f"audit: {len(entries)} entries by status {dict(sorted(by_status.items()))}; "
          f"status 500: {by_status.get(500, 0)}")  # fmt: skip
    print(f"server log: {text.count('Traceback')} tracebacks, {len(text.splitlines())} lines:")
    print("  " + "\n  ".join(text.splitlines()[:10]))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
