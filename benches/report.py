#!/usr/bin/env python3
"""results.tsv (proxy, metric, rep, value) -> markdown table: medians per proxy, and
wharf's ratio to each peer (and to the references, where the scenario has one)."""
import statistics
import sys
from collections import defaultdict

ROWS = [
    # metric, label, unit, better ("high" / "low" / None for text), reference column
    ("a_cold_pull_s", "a. cold pull, skopeo copy --all bench/app:latest (~106 MiB)", "s", "low", None),
    ("a_cold_pull_origin_requests", "   origin requests during the cold pull", "req", "low", None),
    ("b_warm_pull_s", "b. warm pull, same image", "s", "low", None),
    ("b_warm_pull_origin_requests", "   origin requests during the warm pull", "req", "low", None),
    ("c_head_tag_rps", "c. HEAD manifest by tag, keep-alive load", "req/s", "high", "origin"),
    ("c_head_tag_origin_requests", "   origin requests during that load", "req", None, None),
    ("c_get_index_by_digest_rps", "c. GET index by digest", "req/s", "high", "origin"),
    ("c_get_small_blob_rps", "c. GET small cached blob (4 KiB layer)", "req/s", "high", "origin"),
    ("d_cold_big_mbps", "d. cold 1 GiB blob through the proxy, digest checked", "MB/s", "high", "origin"),
    ("d_cold_big_digest", "   digest of the cold GET", "", None, None),
    ("d_cached_big_1_mbps", "d. cached 1 GiB blob, 1 client", "MB/s", "high", "static"),
    ("d_cached_big_n_mbps", "d. cached 1 GiB blob, N clients, aggregate", "MB/s", "high", "static"),
    ("e_herd_origin_gets", "e. herd: origin GETs of the cold 256 MiB blob", "req", "low", None),
    ("e_herd_origin_mb", "e. herd: bytes the origin sent for it", "MB", "low", None),
    ("e_herd_ttfb_first_s", "e. herd: time to first byte, first client", "s", "low", None),
    ("e_herd_ttfb_slowest_s", "e. herd: time to first byte, slowest client", "s", "low", None),
    ("e_herd_complete", "e. herd: clients with a complete 200", "", None, None),
    ("e_herd_digest", "e. herd: digest of client 1's body", "", None, None),
    ("f_peak_rss_ac_mib", "f. peak RSS during a-c", "MiB", "low", None),
    ("f_peak_rss_d_mib", "f. peak RSS during d", "MiB", "low", None),
    ("f_peak_rss_e_mib", "f. peak RSS during e", "MiB", "low", None),
    ("i_idle_opened", "i. idle keep-alive connections opened (of IDLE_CONNS)", "", "high", None),
    ("i_idle_held", "   of them still open after the GETs below", "", None, None),
    ("i_idle_rss_mib", "i. RSS while they are held", "MiB", "low", None),
    ("i_idle_p50_base_ms", "i. cached GET p50, idle server", "ms", "low", None),
    ("i_idle_p50_during_ms", "i. cached GET p50, with the idle connections", "ms", "low", None),
    ("i_idle_latency_x", "   p50 with them / p50 without", "x", "low", None),
    ("g_offline_by_tag", "g. offline pull by tag (origin stopped)", "", None, None),
    ("g_offline_by_digest", "g. offline pull by digest (origin stopped)", "", None, None),
]


def number(v):
    try:
        return float(v)
    except ValueError:
        return None


def cell(values):
    nums = [number(v) for v in values]
    if values and all(n is not None for n in nums):
        med = statistics.median(nums)
        text = f"{med:.3g}" if med < 100 else f"{med:.0f}"
        if len(nums) > 1 and min(nums) != max(nums):
            text += f" [{min(nums):.3g}-{max(nums):.3g}]"
        return text, med
    return (" / ".join(sorted(set(values))), None) if values else ("", None)


def main():
    path, proxies = sys.argv[1], sys.argv[2:]
    data = defaultdict(list)
    for line in open(path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 4 and parts[3] != "":
            data[(parts[0], parts[1])].append(parts[3])
    peers = [p for p in proxies if p != "wharf"]
    head = ["scenario", "unit"] + proxies + ["origin", "static"]
    if "wharf" in proxies:
        head += [f"wharf / {p}" for p in peers] + ["wharf / reference"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for metric, label, unit, better, ref in ROWS:
        cells, meds = [], {}
        for p in proxies + ["origin", "static"]:
            text, med = cell(data.get((p, metric), []))
            cells.append(text)
            meds[p] = med
        if "wharf" in proxies:
            for p in peers + [ref]:
                w, o = meds.get("wharf"), meds.get(p) if p else None
                if better and w is not None and o:
                    r = w / o
                    good = r >= 1 if better == "high" else r <= 1
                    cells.append(f"{r:.2f}× {'✓' if good else '✗'}")
                else:
                    cells.append("")
        print(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    print()
    print("Ratios are wharf's median over the peer's; ✓ when wharf is better or equal "
          "(higher for rates, lower for times, counts and memory). Reference: the origin for "
          "request rates and the cold GET, static nginx (sendfile) for cached blobs.")


if __name__ == "__main__":
    main()
