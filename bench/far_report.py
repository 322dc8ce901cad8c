#!/usr/bin/env python3
"""Turns bench/far.sh's runs into bench/FAR-RESULTS.md (stdout)."""
import argparse
import datetime
import os
import platform
import statistics
from collections import defaultdict

from report import parse, version

TICKS = os.sysconf("SC_CLK_TCK")


SECTION = "## Far upstream (`bench/far.sh`)"


def far_section(results):
    """bench/FAR-RESULTS.md's text as a section of bench/RESULTS.md."""
    body = results.split("\n", 1)[1] if results.startswith("# ") else results
    return f"{SECTION}\n{body.rstrip()}\n"


def replace_section(path, results):
    """Replaces the far section of `path` (up to the next `## ` heading, so
    the sections after it stay), or adds it at the end."""
    with open(path) as f:
        text = f.read()
    head, found, rest = text.partition("\n" + SECTION)
    tail = ""
    if found:
        after = rest.find("\n## ")
        if after != -1:
            tail = "\n" + rest[after + 1 :]
    with open(path, "w") as f:
        f.write(f"{head.rstrip(chr(10))}\n\n{far_section(results)}{tail}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--duration")
    ap.add_argument("--rounds")
    ap.add_argument("--section", help="rewrite this file's far section from RUNS (a FAR-RESULTS.md)")
    args = ap.parse_args()
    if args.section:
        with open(args.runs) as f:
            replace_section(args.section, f.read())
        return

    cells = defaultdict(list)  # (latency, clients, target) -> [run]
    order = []
    with open(args.runs) as f:
        for line in f:
            latency, clients, target, _round, log, ticks, conns, resumed, reqs = line.rstrip("\n").split("\t")
            key = (float(latency), int(clients), target)
            if key not in cells:
                order.append(key)
            run = parse(log)
            run.update(
                ticks=int(ticks), conns=int(conns), resumed=int(resumed), upstream_reqs=int(reqs)
            )
            cells[key].append(run)

    print("# Far upstream: qbproxy, nginx and HAProxy in front of a distant HTTPS/HTTP/2 nginx\n")
    print(f"Written by `bench/far.sh` on {datetime.date.today()} "
          f"(DURATION={args.duration}, ROUNDS={args.rounds}); re-run it to refresh.\n")
    print("The upstream is Debian's nginx with TLS and `http2` (128 streams per connection, "
          "`keepalive_requests` 1000), answering every request after L (`echo_sleep`). "
          "Each proxy is on core 0; wrk (plain HTTP/1.1 keep-alive, `-t1`) and the upstream "
          "share core 1. Figures are the mean of the rounds; p50/p99 are wrk's; errors are "
          "non-2xx answers plus socket errors (connect, read, write, timeout), summed over "
          "the rounds. Upstream connections and resumed TLS handshakes are counted by the "
          "upstream from its own log, the same way for every proxy, summed over the rounds. "
          "Ideal = clients / L.\n")
    print("| L | clients | proxy | req/s | of ideal | p50 ms | p99 ms | errors | upstream conns (resumed) | CPU µs/req |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in order:
        latency, clients, target = key
        runs = cells[key]
        rps = statistics.mean(r["rps"] or 0 for r in runs)
        p50 = statistics.mean(r["p50"] or 0 for r in runs)
        p99 = statistics.mean(r["p99"] or 0 for r in runs)
        errors = sum(r["errors"] for r in runs)
        conns = sum(r["conns"] for r in runs)
        resumed = sum(r["resumed"] for r in runs)
        reqs = sum(r["requests"] for r in runs)
        cpu = sum(r["ticks"] for r in runs) / TICKS / reqs * 1e6 if reqs else 0
        ideal = clients / latency
        print(f"| {latency * 1000:.0f} ms | {clients:,} | {target} | {rps:,.0f} | {rps / ideal:.2f} | "
              f"{p50:.1f} | {p99:.1f} | {errors} | {conns:,} ({resumed:,}) | {cpu:.1f} |")

    print("\nRatios at each cell (qbproxy's req/s over the other's; p99 the other way round):\n")
    print("| L | clients | / nginx req/s | / HAProxy req/s | nginx p99 / qbproxy p99 | HAProxy p99 / qbproxy p99 |")
    print("|---|---|---|---|---|---|")
    seen = []
    for latency, clients, _ in order:
        if (latency, clients) in seen:
            continue
        seen.append((latency, clients))

        def mean(target, field):
            runs = cells.get((latency, clients, target))
            return statistics.mean(r[field] or 0 for r in runs) if runs else None

        q, n, h = (mean(t, "rps") for t in ("qbproxy", "nginx", "haproxy"))
        qp, np_, hp = (mean(t, "p99") for t in ("qbproxy", "nginx", "haproxy"))
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "–"
        print(f"| {latency * 1000:.0f} ms | {clients:,} | {ratio(q, n)} | {ratio(q, h)} | "
              f"{ratio(np_, qp)} | {ratio(hp, qp)} |")

    print("\nVersions: " + "; ".join([
        version(["nginx", "-v"]),
        version(["haproxy", "-v"]),
        version(["wrk", "-v"]),
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    ]))
    print("\nCommand: `bench/far.sh`")


if __name__ == "__main__":
    main()
