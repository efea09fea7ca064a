"""Service: requests/s and latency (p50 / p99) of ``dermlab serve`` under concurrent clients on localhost.

For each engine (PyTorch eager, ONNX Runtime) a real ``dermlab serve`` process is started on a free local
port; ``--clients`` threads then POST a 600x450 JPEG to ``/predict`` over keep-alive connections until
``--requests`` requests are done or ``--duration`` seconds have passed, whichever comes first (both bounded).
Latency is per request, as the client sees it (upload, decode, preprocess, queue for the model, respond).

    python benchmarks/service.py            # about 2 minutes on 2 busy CPU cores
    python benchmarks/service.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_arguments, goal, print_table, summarise_latencies, write_results  # noqa: E402
from inference import make_run, sample_image  # noqa: E402

_BOUNDARY = "dermlab-benchmark-boundary"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _multipart(jpeg: bytes) -> tuple[bytes, dict[str, str]]:
    head = (
        f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"lesion.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    body = head + jpeg + f"\r\n--{_BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={_BOUNDARY}", "Content-Length": str(len(body))}


class Server:
    """``dermlab serve RUN --engine E`` in a child process, stopped on exit."""

    def __init__(self, run: Path, engine: str, log_path: Path, start_timeout: float, threads: int | None = None) -> None:
        self.port = _free_port()
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in __exit__
        command = [sys.executable, "-m", "dermlab", "serve", str(run), "--engine", engine, "--port", str(self.port)]
        env = {**os.environ, "DERMLAB_PROGRESS": "0"}
        if threads:  # torch sizes its intra-op pool from it (onnxruntime uses the physical cores)
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.start_timeout = start_timeout
        self.log_path = log_path

    def __enter__(self) -> Server:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dermlab serve exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    connection.close()
                    return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"dermlab serve did not answer /health within {self.start_timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def server_memory_mib(pid: int) -> dict[str, float]:
    """Resident memory of the server now and its peak so far (Linux /proc; empty elsewhere)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values["rss_mib" if key == "VmRSS" else "peak_rss_mib"] = round(int(rest.split()[0]) / 1024, 1)
    return values


def load_test(port: int, body: bytes, headers: dict[str, str], clients: int, requests: int, duration: float) -> dict:
    """``clients`` threads POST ``/predict`` until ``requests`` are sent or ``duration`` s have passed."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + duration

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=max(30.0, duration))
        while True:
            with lock:
                if issued[0] >= requests or time.monotonic() >= deadline:
                    break
                issued[0] += 1
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                elapsed = time.perf_counter() - started
                if response.status == 200 and b"probabilities" in payload:
                    with lock:
                        latencies.append(elapsed)
                else:
                    with lock:
                        errors.append(f"HTTP {response.status}: {payload[:200]!r}")
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=max(30.0, duration))
        connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "requests_ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency": summarise_latencies(latencies),
        "stopped_by": "time" if len(latencies) + len(errors) < requests else "count",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--size", type=int, default=224, help="input resolution (default 224)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=300, help="requests per engine at most (default 300)")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds per engine at most (default 45)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests first (default 5)")
    parser.add_argument("--engines", default="torch,onnx", help="engines to serve, comma-separated (default torch,onnx)")
    parser.add_argument("--run", type=Path, help="a run folder with export/model.onnx, instead of a random-init model")
    parser.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the server to start")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.clients, args.requests, args.duration, args.warmup = 32, 4, 24, 10.0, 2
        args.model = "test_efficientnet" if args.model == "efficientnet_lite0" else args.model

    buffer = io.BytesIO()
    sample_image().save(buffer, format="JPEG", quality=90)
    body, headers = _multipart(buffer.getvalue())
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="dermlab-bench-") as tmp:
        tmp = Path(tmp)
        run = args.run or make_run(tmp / "run", args.model, args.size)
        print(
            f"{args.model} at {args.size}px; {args.clients} clients, at most {args.requests} requests or "
            f"{args.duration:.0f} s per engine; upload {len(buffer.getvalue()) // 1024} KiB JPEG 600x450",
            flush=True,
        )
        for engine in engines:
            print(f"serving with {engine} ...", flush=True)
            with Server(run, engine, tmp / f"serve-{engine}.log", args.start_timeout, args.threads) as server:
                load_test(server.port, body, headers, 1, args.warmup, args.duration)
                before = server_memory_mib(server.process.pid)
                results[engine] = load_test(server.port, body, headers, args.clients, args.requests, args.duration)
                after = server_memory_mib(server.process.pid)
                # memory bounded: the resident size after the load, next to the size after warm-up
                results[engine]["server_memory_mib"] = {"after_warmup": before, "after_load": after}
            if results[engine]["errors"]:
                print(f"  {results[engine]['errors']} errors, e.g. {results[engine]['first_errors'][0]}", flush=True)

    rows = [
        (
            e, r["requests_ok"], r["errors"], r["requests_per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"],
            r["server_memory_mib"]["after_warmup"].get("rss_mib"), r["server_memory_mib"]["after_load"].get("rss_mib"),
            r["stopped_by"],
        )
        for e, r in results.items()
    ]
    print_table(
        f"dermlab serve, {args.clients} concurrent clients on localhost",
        rows,
        ["engine", "requests", "errors", "requests/s", "p50 ms", "p99 ms", "RSS MiB warm", "RSS MiB after", "stopped by"],
    )
    ratios = {}
    if {"torch", "onnx"} <= set(results) and results["torch"]["requests_per_s"] > 0:
        ratios["onnx_vs_torch_requests_per_s"] = goal(results["onnx"]["requests_per_s"] / results["torch"]["requests_per_s"], 1.5)
        print_table("ratios", list(ratios.items()), ["ratio", "value"])
    write_results("service", args, {"results": results, "ratios": ratios})
    return 1 if any(r["requests_ok"] == 0 for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
