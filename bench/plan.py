"""Time to plan 1, 10 and 100 five-node labs, and how it grows (it should stay linear).

Run: .venv/bin/python bench/plan.py
Prints seconds per batch, milliseconds per lab, and the growth ratio against the 1-lab run
side by side (a linear planner shows ratios close to 10x and 100x).
"""

from __future__ import annotations

import time

from labbuilder.lab.files import parse_lab
from labbuilder.lab.planner import plan
from labbuilder.model.lab import HostFacts, HostRoute, LibvirtNetworkFact

FIVE_NODES = """
name = "bench-{i}"
[nodes.compute]
count = 2
[nodes.block1]
"""
HOST = HostFacts(
    routes=(HostRoute("0.0.0.0/0", "eth0"), HostRoute("192.0.2.0/24", "eth0")),
    libvirt_networks=tuple(
        LibvirtNetworkFact(f"other-{i}", f"virbr{i}", (f"192.168.{i}.0/24",), None)
        for i in range(20)
    ),
    protected_addresses=(("mirror", "198.51.100.7"),),
    cpus=2,
    memory_available=2**40,
    disk_free=2**44,
)


def plan_labs(count: int) -> float:
    texts = [FIVE_NODES.format(i=i) for i in range(count)]
    start = time.perf_counter()
    for i, text in enumerate(texts):
        plan(parse_lab(text, source=f"bench-{i}.toml"), HOST)
    return time.perf_counter() - start


def main() -> None:
    plan_labs(3)  # warm up imports and caches
    base = min(plan_labs(1) for _ in range(5))
    print(f"{'labs':>5} {'seconds':>9} {'ms/lab':>8} {'ratio vs 1 lab':>15}")
    for count in (1, 10, 100):
        seconds = base if count == 1 else min(plan_labs(count) for _ in range(3))
        print(f"{count:>5} {seconds:>9.4f} {seconds / count * 1000:>8.2f} {seconds / base:>14.1f}x")
    verdict = "under" if base < 0.05 else "OVER"
    print(f"one lab: {base * 1000:.1f} ms ({verdict} the 50 ms target)")


if __name__ == "__main__":
    main()
