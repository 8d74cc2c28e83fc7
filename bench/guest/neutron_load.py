#!/usr/bin/env python3
"""Runs *inside a lab's controller* (for bench/neutron_api.py): concurrent clients of neutron's
API doing what the install's launch stage and Tempest's network tests do: create a security
group, add ICMP and TCP 22 rules, create a floating IP on the external network and delete it,
delete the group. Every request has a deadline; a request that passes it counts as a hang.

    python3 neutron_load.py EXTERNAL_NETWORK CLIENTS ROUNDS REQUEST_TIMEOUT

Prints one JSON object: requests made, answered, timed out, errors, and latency percentiles.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import openstack


def client(number: int, network_id: str, rounds: int, timeout: float, out: dict[str, Any]) -> None:
    conn = openstack.connect(api_timeout=timeout)

    def timed(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        begin = time.monotonic()
        try:
            value = call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - counted
            seconds = time.monotonic() - begin
            late = "timed out" in str(err).lower() or seconds >= timeout
            with lock:
                out["timeouts" if late else "errors"].append(
                    f"{what}: {type(err).__name__} after {seconds:.0f} s"
                )
            raise
        with lock:
            out["latencies"].append(time.monotonic() - begin)
        return value

    net = conn.network
    for round_ in range(rounds):
        try:
            group = timed(
                "create group", net.create_security_group, name=f"lbbench-{number}-{round_}"
            )
            for protocol, port in (("icmp", None), ("tcp", 22)):
                timed(
                    f"create {protocol} rule", net.create_security_group_rule,
                    security_group_id=group.id, direction="ingress", protocol=protocol,
                    port_range_min=port, port_range_max=port, remote_ip_prefix="0.0.0.0/0",
                )  # fmt: skip
            address = timed("create floating IP", net.create_ip, floating_network_id=network_id)
            timed("delete floating IP", net.delete_ip, address)
            timed("delete group", net.delete_security_group, group)
        except Exception:  # noqa: BLE001 - counted above; go on with the next round
            continue


lock = threading.Lock()


def main() -> int:
    network, clients, rounds, timeout = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]),
    )
    conn = openstack.connect(api_timeout=timeout)
    network_id = conn.network.find_network(network).id
    out: dict[str, Any] = {"latencies": [], "timeouts": [], "errors": []}
    begin = time.monotonic()
    workers = [
        threading.Thread(target=client, args=(n, network_id, rounds, timeout, out))
        for n in range(clients)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    latencies = sorted(out["latencies"])

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    print(json.dumps({
        "seconds": round(time.monotonic() - begin, 1),
        "answered": len(latencies),
        "timeouts": out["timeouts"],
        "errors": out["errors"],
        "p50": round(percentile(0.5), 2),
        "p95": round(percentile(0.95), 2),
        "max": round(latencies[-1], 2) if latencies else 0.0,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
