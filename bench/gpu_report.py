"""Collects bench/gpu.sh's runs into results.json and results.md (markdown tables for BENCHMARKS.md).

Usage: ``python bench/gpu_report.py RAW_DIR [OUT_DIR]`` where RAW_DIR holds ``flipnet_<dtype>.json``,
``dr2_<dtype>.json``, ``restore_<dtype>.json``, ``clrface_<dtype>.json``, ``machine.txt`` and ``status.txt`` (OUT_DIR defaults to RAW_DIR).
A run that failed or is missing shows as such; the exit code is 1 if any run left no JSON.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _load(raw: Path, name: str):
    path = raw / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(__doc__)
    raw = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else raw
    machine = (raw / "machine.txt").read_text() if (raw / "machine.txt").is_file() else ""
    status = {}
    if (raw / "status.txt").is_file():
        for line in (raw / "status.txt").read_text().splitlines():
            m = re.match(r"(\S+) rc=(-?\d+) seconds=(\d+)", line)
            if m:
                status[m[1]] = {"rc": int(m[2]), "seconds": int(m[3])}
    dtypes = sorted({n.split("_", 1)[1] for n in status} | {p.stem.split("_", 1)[1] for p in raw.glob("*_*.json")})
    runs = {f"{k}_{dt}": _load(raw, f"{k}_{dt}") for dt in dtypes for k in ("flipnet", "dr2", "restore", "clrface")}
    missing = sorted(k for k, v in runs.items() if v is None)

    md = ["# bench/gpu.sh results", "", "```", machine.strip(), "```", ""]
    md += ["## FlipNet step vs plain SD2.1 step (512 px, CFG batch 2, random weights)", "",
           "| dtype | plain | cached (LQ cache) | joint (no cache) | cached measured | cached FLOPs | gap | "
           "joint measured | joint FLOPs | gap | LQ cache / image | peak GPU mem |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dt in dtypes:
        r = runs[f"flipnet_{dt}"]
        if r is None:
            md.append(f"| {dt} | run failed (rc {status.get(f'flipnet_{dt}', {}).get('rc', '?')}) |||||||||||")
            continue
        med, ratio, fr, gap = r["median_s"], r["ratio_to_plain"], r["flop_ratio"], r["gap"]
        cache = r["lq_cache_bytes_per_image"].get(f"measured_{r['dtype']}")
        md.append(f"| {dt} | {_ms(med['plain'])} | {_ms(med['cached'])} | {_ms(med['joint'])} | "
                  f"{ratio['cached']:.3f}x | {fr['cached']:.3f}x | {100 * gap['cached']:+.1f} % | "
                  f"{ratio['joint']:.3f}x | {fr['joint']:.3f}x | {100 * gap['joint']:+.1f} % | "
                  f"{(cache or 0) / 1e6:.0f} MB | {r.get('peak_memory_gib', float('nan')):.2f} GiB |")
    md += ["", "## DR2 refinement overhead per step (512 px, batch 1)", "",
           "| dtype | UNet step | latent refinement | vs UNet | pixel refinement | vs UNet | DDPM transition |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for dt in dtypes:
        r = runs[f"dr2_{dt}"]
        if r is None:
            md.append(f"| {dt} | run failed (rc {status.get(f'dr2_{dt}', {}).get('rc', '?')}) ||||||")
            continue
        med, rat = r["median_s"], r["ratio_to_unet"]
        pix = med.get("pixel_refinement")
        pix_ratio = "-" if pix is None else f"{100 * rat['pixel_refinement']:.0f} %"
        md.append(f"| {dt} | {_ms(med['unet'])} | {_ms(med['latent_refinement'])} | "
                  f"{100 * rat['latent_refinement']:.2f} % | {_ms(pix)} | {pix_ratio} | "
                  f"{_ms(med['ddpm_transition'])} |")
    md += ["", "## Whole restore, one 512 px face (seconds per face, peak GPU memory from the case's start)", "",
           "| dtype | case | steps (UNet batch) | s / face | s / step | peak GPU mem | before (weights) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for dt in dtypes:
        r = runs[f"restore_{dt}"]
        if r is None:
            md.append(f"| {dt} | run failed (rc {status.get(f'restore_{dt}', {}).get('rc', '?')}) ||||||")
            continue
        for case, c in r["cases"].items():
            step = "-" if c["median_step_s"] is None else f"{c['median_step_s']:.3f}"
            md.append(f"| {dt} | {case} | {r['steps']} ({c['unet_batch']}) | {c['seconds_per_face']:.2f} | {step} | "
                      f"{c['peak_memory_gib']:.2f} GiB | {c['memory_before_gib']:.2f} GiB |")
    md += ["", "## CLR-Face guided Heun step vs unguided step (512 px, batch 1, CFG 1, identity iresnet r50, random "
           "weights; per model call, medians)", "",
           "| dtype | UNet call | decode fwd | decode bwd | identity fwd + bwd | guidance call | unguided step | "
           "guided step | measured | FLOPs | window call (margin) | guide every k-th step under 1.5x (full / window) | "
           "peak GPU mem: unguided / guided / window step |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dt in dtypes:
        r = runs[f"clrface_{dt}"]
        if r is None:
            md.append(f"| {dt} | run failed (rc {status.get(f'clrface_{dt}', {}).get('rc', '?')}) ||||||||||||")
            continue
        pc, st, wc = r["median_s_per_call"], r["median_s_step"], r["median_s_window_call"]
        ks = " / ".join(str(d["k_min"]) for d in r["fraction"]["by_decoder"].values())
        mem = r.get("peak_memory") or {}
        mems = " / ".join(f"{mem[v]['peak_gib']:.2f}" if "peak_gib" in mem.get(v, {}) else "-"
                          for v in ("unguided", "guided", "guided_window"))
        md.append(f"| {dt} | {_ms(pc['unet'])} | {_ms(pc['decode_fwd'])} | {_ms(pc['decode_bwd'])} | "
                  f"{_ms(pc['identity_fwd'] + pc['identity_bwd'])} | {_ms(pc['guidance_total'])} | "
                  f"{_ms(st['unguided'])} | {_ms(st['guided'])} | {r['ratio']:.2f}x | {r['flop_ratio']:.2f}x | "
                  f"{_ms(wc['guidance_total'])} ({r['window_margin_timed']}) | {ks} | {mems} GiB |")
    md += ["", "Return codes (flipnet/dr2: 1 = target not met, a result; other non-zero = failure): "
           + ", ".join(f"{k} {v['rc']} ({v['seconds']} s)" for k, v in status.items()), ""]
    if missing:
        md += [f"Missing results: {', '.join(missing)}", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps({"machine": machine, "status": status, "runs": runs}, indent=1))
    print("\n".join(md))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
