"""FlipNet restoration UNet step with the LQ cache vs a plain SD2.1 step (design §7), measured side by side in one run.

Full SD2.1-base topology with random weights (timing only): UNet2DConditionModel from sd.convert's
SD21_BASE_UNET_CONFIG (866 M parameters), fp32, 512 px (64x64 latent), classifier-free guidance (uncond + cond rows,
so 1 image = UNet batch 2), context of 77 text tokens (+ --face-tokens) of width 1024. No LoRA modules: in ComfyUI
the LoRA is merged into the UNet weights, so it costs nothing at inference. BoostHub comes from the pack
(lora.boosthub.install_boosthub, one processor per self-attention layer, 16 for SD2.1) with random non-zero W_o, so
the branch really computes. Per repeat, interleaved so that machine load hits every case alike:

- plain: the stock UNet step (diffusers' own processors, BoostHub not installed) at batch 2B;
- cached: the FlipNet step with the LQ cache at batch 2B (``cache_mode="replay"``): the condition stream's K/V of
  every BoostHub layer were recorded once beforehand (``"record"`` pass at batch 2B, timed once and reported
  separately), the step runs only the HQ rows plus the BoostHub branch against the cached K/V;
- joint: the FlipNet step without the cache (``cache_mode="off"``): the joint batch cat([HQ, LQ]) at batch 4B, as
  pipelines.flipnet runs it with policy ``t_y = same``.

Run: ``python bench/flipnet.py`` (see --help); medians over --repeats, ratios = median case / median plain.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (build_sd21_unet, command, loadavg, machine, n_params, peak_rss_gb, require_pack, setup_logging,
                    timed, unet_bench_parser)

boosthub, flipnet = require_pack("lora.boosthub", "pipelines.flipnet")


def main(argv=None) -> int:
    ap = unet_bench_parser(__doc__, batch_help="images per step (CFG doubles it: 1 image = UNet batch 2)", repeats=3,
                           threads=2, threads_help="torch threads")
    ap.add_argument("--face-tokens", type=int, default=0, help="extra context tokens appended to the 77 text tokens")
    ap.add_argument("--phi", type=float, default=1.0, help="BoostHub enhance weight")
    ap.add_argument("--wo-std", type=float, default=0.02, help="std of the random BoostHub W_o (weight and bias)")
    args = ap.parse_args(argv)
    setup_logging()
    log = logging.getLogger("bench.flipnet")
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    t0 = time.perf_counter()
    unet = build_sd21_unet()
    n_params_unet = n_params(unet)
    plain_procs = dict(unet.attn_processors)
    state = boosthub.install_boosthub(unet, boosthub.BoostHubState(phi=args.phi))
    hub_procs = dict(unet.attn_processors)
    hubs = boosthub.boosthub_processors(unet)
    with torch.no_grad():
        for proc in hubs.values():
            torch.nn.init.normal_(proc.hub.out_proj.weight, std=args.wo_std)
            torch.nn.init.normal_(proc.hub.out_proj.bias, std=args.wo_std)
    n_hub = sum(n_params(proc.hub) for proc in hubs.values())
    log.info("+ BoostHub on %d self-attention layers (%.0f M params), %.0f s in all; load average %s", len(hubs),
             n_hub / 1e6, time.perf_counter() - t0, " ".join(f"{v:.2f}" for v in load_start))

    b, h = args.batch, args.size // 8
    rows = 2 * b  # CFG: uncond + cond rows
    n_ctx = 77 + args.face_tokens
    x_in = torch.randn(rows, 4, h, h)  # scaled HQ latent, repeated for CFG
    y = torch.randn(b, 4, h, h).repeat(2, 1, 1, 1)  # the diffused LQ latent at t_y, repeated for CFG
    ctx = torch.randn(rows, n_ctx, 1024)  # cat([neg, pos])
    t_step, t_y = 501, 400
    tt = torch.full((rows,), t_step, dtype=torch.long)
    ty = torch.full((rows,), t_y, dtype=torch.long)
    joint_x = flipnet.joint_batch(x_in, y)
    joint_t, joint_ctx = torch.cat([tt, ty]), torch.cat([ctx, ctx])

    def use(procs, mode="off"):
        unet.set_attn_processor(dict(procs))
        state.cache_mode = mode

    def plain():
        use(plain_procs)
        return unet(x_in, tt, ctx).sample

    def record():
        state.kv_cache.clear()
        use(hub_procs, "record")
        unet(y, ty, ctx)

    def cached():
        use(hub_procs, "replay")
        return unet(x_in, tt, ctx).sample

    def joint():
        use(hub_procs, "off")
        return unet(joint_x, joint_t, joint_ctx).sample[:rows]

    times = {"plain": [], "cached": [], "joint": []}
    with torch.no_grad():
        log.info("warm-up ...")
        plain()
        t_record, _ = timed(record)
        log.info("record pass (once per image, batch %d): %.2f s; %d layers cached", rows, t_record,
                 len(state.kv_cache))
        cached()
        joint()
        outs = {}
        for r in range(args.repeats):
            for name, fn in (("plain", plain), ("cached", cached), ("joint", joint)):
                dt, outs[name] = timed(fn)
                times[name].append(dt)
            log.info("repeat %d/%d: plain %.2f s, cached %.2f s, joint %.2f s", r + 1, args.repeats,
                     *(times[k][-1] for k in times))
    load_end = loadavg()
    # sanity: the branch computes (cached != plain) and record + replay equals the joint batch
    boost_effect = float((outs["cached"] - outs["plain"]).abs().max())
    cache_vs_joint = float((outs["cached"] - outs["joint"]).abs().max())

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {"cached": med["cached"] / med["plain"], "joint": med["joint"] / med["plain"],
             "record_once": t_record / med["plain"]}
    result = {
        "command": command("flipnet.py", argv), "machine": machine(),
        "batch_images": b, "unet_rows_plain_cached": rows, "unet_rows_joint": 2 * rows, "size": args.size,
        "context_tokens": n_ctx, "phi": args.phi, "wo_std": args.wo_std, "dtype": "float32", "lora": "merged (none)",
        "unet_params": n_params_unet, "boosthub_params": n_hub, "boosthub_layers": len(hubs),
        "times_s": times, "median_s": med, "record_once_s": t_record, "ratio_to_plain": ratio,
        "max_abs_cached_minus_plain": boost_effect, "max_abs_cached_minus_joint": cache_vs_joint,
        "loadavg_start": load_start, "loadavg_end": load_end, "peak_rss_gb": peak_rss_gb(),
    }
    print(f"FlipNet restoration step at {args.size} px, {b} image(s), CFG ({result['machine']}), "
          f"context {n_ctx} tokens, medians of {args.repeats}:")
    print(f"  {'case':<52}{'median':>10}{'vs plain':>10}")
    print(f"  {f'plain SD2.1 step, batch {rows}':<52}{med['plain']:>9.2f}s{1:>10.2f}")
    print(f"  {f'FlipNet + LQ cache (replay), batch {rows}':<52}{med['cached']:>9.2f}s{ratio['cached']:>10.2f}")
    print(f"  {f'FlipNet joint batch, no cache, batch {2 * rows}':<52}{med['joint']:>9.2f}s{ratio['joint']:>10.2f}")
    print(f"  {f'LQ cache record pass (once per image), batch {rows}':<52}{t_record:>9.2f}s"
          f"{ratio['record_once']:>10.2f}")
    print(f"with the LQ cache {ratio['cached']:.3f}x a plain step (target <= 1.10x): "
          f"{'OK' if ratio['cached'] <= 1.10 else 'OVER'}; without it {ratio['joint']:.2f}x")
    print(f"checks: max|cached - plain| = {boost_effect:.3g} (BoostHub active), max|cached - joint| = "
          f"{cache_vs_joint:.3g} (cache equals joint batch)")
    print(f"load average start {' '.join(f'{v:.2f}' for v in load_start)}, end "
          f"{' '.join(f'{v:.2f}' for v in load_end)}; peak RSS {result['peak_rss_gb']:.1f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if ratio["cached"] <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
