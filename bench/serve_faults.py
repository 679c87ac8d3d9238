"""Online faults: SIGKILL a model replica of `jobs/serve.py` under load and measure what the
clients see: requests answered per status, the longest wait (no request may hang), and how
long after the kill answers come again.

Builds testkit's small Llama with --adapters LoRA adapters, starts `python jobs/serve.py`
(its own local Ray, in a process session of its own) with --replicas model replicas, sends
completion requests from --concurrency client threads cycling over every adapter and the
base model (a client that gets 503 waits Retry-After seconds, as OpenAI's client does),
kills one model replica process (`ray::ServeReplica...SwitchyardModel`) after
--kill-after seconds, and keeps the load on for --seconds in all. Then the server is stopped.

    .venv/bin/python bench/serve_faults.py [--replicas 1 2] [--concurrency 8] [--seconds 60]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="model replicas, one run each")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--adapters", type=int, default=4, help="LoRA adapters in the store")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the load, the kill included")
    p.add_argument("--kill-after", type=float, default=10.0, help="seconds of load before the kill")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout: a request over it counts as hung")
    return p.parse_args(argv)


def build(root: Path, n_adapters: int) -> tuple[str, str, list[str]]:
    """testkit's small Llama and a store of LoRA adapters (r=8 on q and v)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from testkit.adapters import save_adapter
    from testkit.models import build_llama

    model = build_llama(root / "model")
    names = [f"adapter-{i}" for i in range(n_adapters)]
    for i, name in enumerate(names):
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        save_adapter(model, root / "store", name, lora, model_class=AutoModelForCausalLM, seed=i + 1)
    return model, str(root / "store"), names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, store: str, replicas: int, port: int, log: Path) -> subprocess.Popen:
    cpus = os.cpu_count() or 2
    command = [sys.executable, "jobs/serve.py", "--model", model, "--adapters", store, "--task", "generate",
               "--port", str(port), "--num-replicas", str(replicas), "--num-cpus", str(min(1.0, cpus / (2 * replicas))),
               "--max-new-tokens", "8"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while "is serving at" not in log.read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"jobs/serve.py did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return server


def replica_pids(server: subprocess.Popen) -> list[int]:
    listing = subprocess.run(["ps", "-s", str(server.pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines()
            if "ServeReplica" in line and "SwitchyardModel" in line]


def load(url: str, models: list[str], args: argparse.Namespace, kill) -> list[tuple[float, float, int]]:
    """(start, end, status) of every request, times relative to the kill (status 0: timed out)."""
    import httpx

    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    stop_at = t0 + args.seconds
    killed_at: list[float] = []

    def client(k: int) -> None:
        with httpx.Client(timeout=args.timeout) as http:
            i = k
            while time.monotonic() < stop_at:
                body = {"model": models[i % len(models)], "prompt": f"the cat {i}", "max_tokens": 8}
                start = time.monotonic()
                wait = 0.0
                try:
                    response = http.post(f"{url}/v1/completions", json=body)
                    status = response.status_code
                    wait = float(response.headers.get("retry-after", 0)) if status == 503 else 0.0
                except httpx.TimeoutException:
                    status = 0
                except httpx.HTTPError:
                    status = -1
                with lock:
                    results.append((start, time.monotonic(), status))
                time.sleep(wait)  # as OpenAI's client does with Retry-After
                i += args.concurrency

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.concurrency)]
    for t in threads:
        t.start()
    time.sleep(args.kill_after)
    killed_at.append(time.monotonic())
    kill()
    for t in threads:
        t.join()
    return [(s - killed_at[0], e - killed_at[0], status) for s, e, status in results]


def report(replicas: int, results: list[tuple[float, float, int]], timeout: float) -> str:
    before = [r for r in results if r[1] < 0]
    after = [r for r in results if r[1] >= 0]
    statuses = collections.Counter(status for _, _, status in after)
    failed = [r for r in after if r[2] != 200]
    resumed = min((e for s, e, status in after if status == 200 and s >= 0), default=float("nan"))
    last_failure = max((e for _, e, status in failed), default=0.0)
    longest = max(e - s for s, e, _ in results)
    return (f"| {replicas} | {len(before)} | {len(after)} | "
            f"{', '.join(f'{k} x{v}' for k, v in sorted(statuses.items()))} | {len(failed)} | "
            f"{last_failure:.1f} | {resumed:.1f} | {longest:.1f} (timeout {timeout:g}) |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, store, names = build(root, args.adapters)
        lines = []
        for replicas in args.replicas:
            port = free_port()
            server = start_server(model, store, replicas, port, root / f"serve-{replicas}.log")
            try:
                pids = replica_pids(server)
                assert len(pids) == replicas, pids
                results = load(f"http://127.0.0.1:{port}", [Path(model).name, *names], args,
                               lambda: os.kill(pids[0], signal.SIGKILL))
            finally:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    subprocess.run(["pkill", "-9", "-s", str(server.pid)], check=False)
            lines.append(report(replicas, results, args.timeout))
        print(f"one model replica SIGKILLed after {args.kill_after:g} s of load from {args.concurrency} clients "
              f"(completions, 8 tokens, {args.adapters} adapters and the base); times in s after the kill")
        print("| replicas | answers before the kill | requests after it | their statuses | failed | last failure "
              "ends | first success started after the kill ends | longest request |")
        print("|---|---|---|---|---|---|---|---|")
        for line in lines:
            print(line)


if __name__ == "__main__":
    main()
