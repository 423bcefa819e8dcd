"""``python -m launchers.check --out DIR``: a cluster-setup check to run before training.

Every rank discovers its place in the job (launchers/env.py), initialises a gloo process
group through ``ParallelContext`` (the same path training takes), all-reduces the rank ids and
writes ``DIR/rank<k>.json``; rank 0 prints one summary line. If this passes, rank discovery,
rendezvous and the network between the ranks work; ``seqmoe launch --check`` runs it under the
configured launcher.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from launchers.env import LaunchEnvError, discover_environment

__all__ = ["main", "run_check"]


def run_check(
    out_dir: str | Path, *, expected_world_size: int | None = None, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Run the check on this rank and return what it wrote to ``out_dir/rank<k>.json``."""
    start = time.monotonic()
    env = discover_environment(expected_world_size=expected_world_size)
    env.export()
    # imported after discovery: torch is slow to import, and a bad environment should fail fast
    import torch
    import torch.distributed as dist

    from parallel.context import ParallelContext

    ctx = ParallelContext.initialize(backend="gloo", device="cpu", timeout_s=timeout_s)
    try:
        total = torch.tensor([env.rank], dtype=torch.int64)
        hosts = [socket.gethostname()]
        if env.world_size > 1:
            dist.all_reduce(total, group=ctx.world)
            hosts = [None] * env.world_size
            dist.all_gather_object(hosts, socket.gethostname(), group=ctx.world)
    finally:
        ctx.destroy()
    expected = env.world_size * (env.world_size - 1) // 2
    record = {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "local_world_size": env.local_world_size,
        "hostname": socket.gethostname(),
        "source": env.source,
        "master_addr": env.master_addr,
        "master_port": env.master_port,
        "all_reduce_sum": int(total.item()),
        "expected_sum": expected,
        "ok": int(total.item()) == expected,
        "hosts": hosts,
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{env.rank}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / f"rank{env.rank}.json")  # readers never see a half-written file
    return record


def _summary(record: dict[str, Any], out_dir: str | Path) -> str:
    hosts = sorted(set(record["hosts"]))
    verdict = "OK" if record["ok"] else "FAILED"
    return (
        f"seqmoe check {verdict}: {record['world_size']} ranks on {len(hosts)} host(s) ({', '.join(hosts)}), "
        f"found via {record['source']}, rendezvous {record['master_addr']}:{record['master_port']}; all_reduce of "
        f"the rank ids = {record['all_reduce_sum']} (expected {record['expected_sum']}); {record['elapsed_s']:.1f} s; "
        f"rank files in {out_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for rank<k>.json")
    parser.add_argument("--expected-world-size", type=int, help="fail unless the job has this many ranks")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the other ranks")
    args = parser.parse_args(argv)
    try:
        record = run_check(args.out, expected_world_size=args.expected_world_size, timeout_s=args.timeout)
    except LaunchEnvError as exc:
        print(f"seqmoe check: {exc}", file=sys.stderr)
        return 2
    if record["rank"] == 0 or not record["ok"]:
        print(_summary(record, args.out), flush=True)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
