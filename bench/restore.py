"""Seconds per face and peak memory of whole restores (design §7): FlipNet restoration and DR2, one run each.

Full SD2.1-base components with random weights (timing and memory only): the UNet (866 M parameters) with the
pack's BoostHub (16 layers, random non-zero W_o), the SD AutoencoderKL, the SD2 text encoder (CLIPTextModel, 23
layers) and a stand-in tokenizer (no vocabulary offline; ids do not matter with random weights), in --dtype on
--device. No LoRA modules (merged into the UNet at inference) and no face tokens (no face encoder: 77 text tokens).

- flipnet: ``pipelines.flipnet.FlipNetPipeline`` in restore mode on one LQ image: VAE encode, text encoder (prompt
  and negative prompt), policy ``t_y = fixed`` with the LQ cache (one record pass, then --steps DDIM steps on the HQ
  rows only), CFG 1.5 (UNet batch 2), VAE decode;
- dr2-latent / dr2-pixel: ``pipelines.dr2.restore`` (N = 2 latent px / 16 px, tau = 35, omega = tau + steps - 1,
  so exactly --steps UNet evaluations at batch 1, CFG 1): VAE encode, the DR2 loop, VAE decode.

Peak memory of each case from its own start: on CUDA torch.cuda.max_memory_allocated (reset before each case), on
the CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs), beside the resident memory before the
case (all weights loaded) and the RSS after every step (flat = nothing accumulates per step). The LQ cache's size is
read from the pipeline's cache dict during the first step. Times on the wall clock and, on the CPU, on the process
CPU clock too (with --threads 1 it counts the work done, not the waits for a core on a shared machine).

Run: ``python bench/restore.py`` (see --help).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from common import (add_device_flags, build_sd21_text_encoder, build_sd21_unet, build_sd21_vae, command, device_dtype,
                    loadavg, machine, n_params, peak_memory_gb, reset_peak_memory, rss_gb, setup_logging, StubTokenizer,
                    sync, tensor_bytes, require_pack)

boosthub, flipnet, dr2, loader, checkpoint, convert = require_pack(
    "lora.boosthub", "pipelines.flipnet", "pipelines.dr2", "sd.loader", "lora.checkpoint", "sd.convert")

CASES = ("flipnet", "dr2-latent", "dr2-pixel")


def current_memory_gb(device) -> float:
    """Memory held now: torch.cuda.memory_allocated on CUDA, else this process's RSS (GiB)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1024 ** 3
    return rss_gb()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="face size in px (latent = size/8)")
    ap.add_argument("--steps", type=int, default=20, help="FlipNet DDIM steps = DR2 UNet evaluations")
    ap.add_argument("--cases", default="flipnet,dr2-latent", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU; 1: the CPU clock counts work)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed 2-step run of each case first "
                    "(default: 1 on CUDA, 0 on the CPU)")
    ap.add_argument("--json", help="also write the results here")
    add_device_flags(ap)
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = sorted(set(cases) - set(CASES))
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {CASES}")
    setup_logging()
    log = logging.getLogger("bench.restore")
    device, dtype = device_dtype(args)
    if device.type == "meta":
        ap.error("--device meta has no data to restore; use cpu or cuda")
    torch.set_num_threads(args.threads)
    load_start = loadavg()

    unet = build_sd21_unet(device=device, dtype=dtype)
    plain_procs = dict(unet.attn_processors)
    state = boosthub.install_boosthub(unet, boosthub.BoostHubState())
    hub_procs = dict(unet.attn_processors)
    with torch.no_grad():
        for proc in boosthub.boosthub_processors(unet).values():
            torch.nn.init.normal_(proc.hub.out_proj.weight, std=0.02)
            torch.nn.init.normal_(proc.hub.out_proj.bias, std=0.02)
    vae = build_sd21_vae(device=device, dtype=dtype)
    text_encoder = build_sd21_text_encoder(device=device, dtype=dtype)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(dict(convert.SD21_BASE_SCHEDULER_CONFIG))
    pipe = flipnet.FlipNetPipeline(unet, vae, text_encoder, StubTokenizer(), scheduler, state,
                                   defaults=checkpoint.FlipNetDefaults(1.0, "fixed", 100))
    model = loader.SDModel(unet=unet, vae=vae, source="random weights", is_real=False)
    weights = {"unet": tensor_bytes(list(p for n, p in unet.named_parameters() if ".processor." not in n)),
               "boosthub": sum(tensor_bytes(list(p.hub.parameters()))
                               for p in boosthub.boosthub_processors(unet).values()),
               "vae": tensor_bytes(list(vae.parameters())), "text_encoder": tensor_bytes(list(text_encoder.parameters()))}
    weights_gib = {k: v / 1024 ** 3 for k, v in weights.items()}
    log.info("weights (GiB): %s", ", ".join(f"{k} {v:.2f}" for k, v in weights_gib.items()))

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, args.size, args.size, generator=gen)  # the LQ face, in [0, 1]

    def run(case: str, steps: int, trace: dict | None = None):
        def on_step(i, total):
            sync(device)
            if trace is not None:
                trace["step_s"].append(time.perf_counter())
                trace["step_cpu_s"].append(time.process_time())
                trace["memory_gib"].append(current_memory_gb(device))
                if case == "flipnet" and i == 1:
                    trace["lq_cache_bytes"] = tensor_bytes(state.kv_cache)

        if case == "flipnet":
            unet.set_attn_processor(dict(hub_procs))
            return pipe(image, flipnet.FlipNetSampleConfig(num_inference_steps=steps, lq_cache=True), callback=on_step)
        unet.set_attn_processor(dict(plain_procs))  # DR2 runs the base model
        space = case.removeprefix("dr2-")
        cfg = dr2.DR2Config(n=2.0 if space == "latent" else 16.0, tau=35, omega=35 + steps - 1, space=space)
        return dr2.restore(model, image, cfg, progress=on_step).images

    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    results = {}
    with torch.no_grad():
        for _ in range(warmup):
            for case in cases:
                run(case, 2)
        for case in cases:
            sync(device)
            before = current_memory_gb(device)
            reset_peak_memory(device)
            trace = {"step_s": [], "step_cpu_s": [], "memory_gib": []}
            t0, c0 = time.perf_counter(), time.process_time()
            out = run(case, args.steps, trace)
            sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            steps_s = [b - a for a, b in zip(trace["step_s"], trace["step_s"][1:])]
            steps_cpu = [b - a for a, b in zip(trace["step_cpu_s"], trace["step_cpu_s"][1:])]
            results[case] = {
                "seconds_per_face": wall, "cpu_seconds_per_face": cpu, "unet_batch": 2 if case == "flipnet" else 1,
                "median_step_s": sorted(steps_s)[len(steps_s) // 2] if steps_s else None,
                "median_step_cpu_s": sorted(steps_cpu)[len(steps_cpu) // 2] if steps_cpu else None,
                "step_s": steps_s, "step_cpu_s": steps_cpu,
                "memory_before_gib": before, "peak_memory_gib": peak_memory_gb(device),
                "memory_per_step_gib": trace["memory_gib"], "lq_cache_bytes": trace.get("lq_cache_bytes"),
                "output_finite": bool(torch.isfinite(out).all()),
            }
            r = results[case]
            log.info("%s: %.2f s per face (%.2f CPU s), peak %.2f GiB (%.2f GiB before); load %.2f", case, wall, cpu,
                     r["peak_memory_gib"], before, loadavg()[0])
    load_end = loadavg()
    kind = "GPU memory (max_memory_allocated)" if device.type == "cuda" else "RSS"
    result = {"command": command("restore.py", argv), "machine": machine(device), "device": str(device),
              "dtype": str(dtype).removeprefix("torch."), "size": args.size, "steps": args.steps,
              "threads": torch.get_num_threads(),
              "params": {"unet": n_params(unet), "vae": n_params(vae), "text_encoder": n_params(text_encoder)},
              "weights_gib": weights_gib, "memory_kind": kind, "cases": results,
              "loadavg_start": load_start, "loadavg_end": load_end}
    print(f"Restore at {args.size} px, 1 face, {args.steps} steps ({result['machine']}, {result['dtype']}); weights "
          f"{sum(weights_gib.values()):.2f} GiB (" + ", ".join(f"{k} {v:.2f}" for k, v in weights_gib.items()) + "):")
    short = "GPU" if device.type == "cuda" else "RSS"
    on_cpu = device.type == "cpu"
    print(f"  {'case':<14}{'s/face':>9}{'s/step':>9}" + (f"{'CPU s/face':>12}{'CPU s/step':>12}" if on_cpu else "")
          + f"{f'peak {short}, GiB':>16}{'before':>9}{'after each step':>18}")
    for case, r in results.items():
        mem = r["memory_per_step_gib"]
        step = f"{r['median_step_s']:.3f}" if r["median_step_s"] is not None else "-"
        cpu_step = f"{r['median_step_cpu_s']:.3f}" if r["median_step_cpu_s"] is not None else "-"
        span = f"{min(mem):.2f}-{max(mem):.2f}" if mem else ""
        print(f"  {case:<14}{r['seconds_per_face']:>9.2f}{step:>9}"
              + (f"{r['cpu_seconds_per_face']:>12.2f}{cpu_step:>12}" if on_cpu else "")
              + f"{r['peak_memory_gib']:>16.2f}{r['memory_before_gib']:>9.2f}{span:>18}")
    if results.get("flipnet", {}).get("lq_cache_bytes") is not None:
        print(f"  LQ cache during the FlipNet run: {results['flipnet']['lq_cache_bytes'] / 1e6:.1f} MB "
              f"({result['dtype']}, 2 CFG rows)")
    print(f"load average start {' '.join(f'{v:.2f}' for v in load_start)}, end "
          f"{' '.join(f'{v:.2f}' for v in load_end)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(r["output_finite"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
