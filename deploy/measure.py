"""Measure one `sparseinfer serve` process, to size the Kubernetes resource requests (docs/deployment.md).

Starts the server the way deploy/k8s/deployment.yaml does (bundled model unless ``--model``), waits for it to
answer, then reads its own /proc entries: resident memory (VmRSS, and the peak VmHWM) idle and under
``--clients`` closed-loop streaming clients, and its CPU time (utime + stime of every thread) over the load
window, as cores. The clients run in this process, so on a small machine they compete with the server for
CPU: the CPU figure is what the server used, the throughput a lower bound.

    python deploy/measure.py --threads 1 --clients 16 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from sparseinfer_client import NO_RETRY, Client

_TICK = os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, its file-backed part RssFile (libraries, the mapped checkpoint) and the peak VmHWM, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces: skip past it
    return (int(rest[11]) + int(rest[12])) / _TICK


def start(args: argparse.Namespace) -> tuple[subprocess.Popen[str], int]:
    serve = Path(sys.executable).with_name("sparseinfer")  # the venv's console script
    command = [str(serve), "serve", "--port", "0", "--threads", str(args.threads)]
    command += ["--sparsity", args.sparsity] + (["--model", args.model] if args.model else [])
    # Its logs go nowhere: a pipe nobody reads would fill up and block the server.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "sparseinfer: serving DIR on HOST:PORT", printed once it is bound
    found = re.search(r":(\d+)$", line.strip())
    if found is None:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, int(found.group(1))


def load(port: int, clients: int, seconds: float, max_new_tokens: int) -> int:
    """Run ``clients`` closed-loop streams for ``seconds``; return the tokens they received."""
    end = time.monotonic() + seconds
    counts = [0] * clients

    def loop(i: int) -> None:
        with Client(f"127.0.0.1:{port}", retry=NO_RETRY, timeout=60) as c:
            while time.monotonic() < end:
                for chunk in c.generate_stream("And it came to pass", max_new_tokens=max_new_tokens, seed=i):
                    if chunk.usage is not None:  # the last chunk
                        counts[i] += chunk.usage.generated_tokens

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint dir (default: the bundled model)")
    p.add_argument("--threads", type=int, default=1, help="the server's --threads")
    p.add_argument("--sparsity", default="predicted")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-new-tokens", type=int, default=100)
    args = p.parse_args()
    proc, port = start(args)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_ready(30)
            c.generate("warm up", max_new_tokens=8)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(2.0)
        idle_cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        idle = memory_kib(proc.pid)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        tokens = load(port, args.clients, args.seconds, args.max_new_tokens)
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        busy = memory_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        json.dumps(
            {
                "threads": args.threads,
                "clients": args.clients,
                "idle_rss_mib": round(idle["VmRSS"] / 1024, 1),
                "idle_rss_file_mib": round(idle["RssFile"] / 1024, 1),
                "idle_cpu_cores": round(idle_cpu, 3),
                "load_rss_mib": round(busy["VmRSS"] / 1024, 1),
                "peak_rss_mib": round(busy["VmHWM"] / 1024, 1),
                "load_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 2),
                "tokens_per_s": round(tokens / (t1 - t0), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
