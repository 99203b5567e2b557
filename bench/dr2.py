"""DR2 refinement overhead per step vs the SD2.1-base UNet step, measured side by side in one run.

Full SD2.1-base topology with random weights (timing only): UNet2DConditionModel from sd.convert's
SD21_BASE_UNET_CONFIG (866 M parameters) and, for space=pixel, the SD AutoencoderKL (SD21_BASE_VAE_CONFIG).
Per repeat, interleaved so that machine load hits every component alike:

- unet: one eps_theta(x_t, t) call at batch B, 512 px (64x64 latent), null context (DR2 runs at CFG 1), in
  --dtype (fp32 by default) on --device;
- latent refinement: what DR2 adds to a step in space=latent: the step's noise draws (z and eps, CPU generator,
  moved to the device) plus Eq. 10 (diffuse y to the level, Phi_N down/up as two matmuls with ILVR's MATLAB-imresize
  matrices, add) - ilvr.LatentRefiner, in float32 as pipelines.dr2 runs it;
- pixel refinement: space=pixel: decode x0-hat, Phi_N in pixels, re-encode, plus the latent noise part -
  ilvr.PixelRefiner;
- the DDPM transition itself (ilvr.ancestral_step) is reported for reference; every sampler has one.

Every component is timed on the wall clock and on the process CPU clock (with --threads 1 the CPU clock counts the
work done, not the time spent waiting for a core on a shared machine); the verdict uses the CPU clock on the CPU.

Run: ``python bench/dr2.py`` (see --help); medians over --repeats, ratios = median component / median UNet.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path

import torch
from common import (build_sd21_unet, build_sd21_vae, command, device_dtype, loadavg, machine, peak_memory_gb,
                    peak_rss_gb, require_pack, setup_logging, timed_cpu, unet_bench_parser)

ilvr, diffusion, codec = require_pack("pipelines.ilvr", "sd.diffusion", "sd.vae")


def main(argv=None) -> int:
    ap = unet_bench_parser(__doc__, batch_help="images per UNet call (DR2 is unconditional: 1 image = 1)", repeats=5,
                           threads=1, threads_help="torch threads (0 = torch default; 1: the CPU clock counts work)")
    ap.add_argument("--n-latent", type=float, default=2.0, help="N for space=latent (latent px)")
    ap.add_argument("--n-pixel", type=float, default=16.0, help="N for space=pixel (image px)")
    ap.add_argument("--no-pixel", action="store_true", help="skip the VAE round trip (space=pixel)")
    args = ap.parse_args(argv)
    setup_logging()
    log = logging.getLogger("bench.dr2")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = device_dtype(args)
    load_start = loadavg()
    unet = build_sd21_unet(device=device, dtype=dtype)
    vae = None if args.no_pixel else build_sd21_vae(device=device, dtype=dtype)

    b, h = args.batch, args.size // 8
    sigmas = diffusion.sigmas_from_alphas_cumprod(diffusion.sd_alphas_cumprod())
    s, s_next = float(sigmas[474]), float(sigmas[464])  # one DR2 transition (tau=22 -> omega=47 range, T=100)
    # latents and the refinement in float32 (pipelines.dr2 keeps them so); the UNet call in --dtype
    y = torch.randn(b, 4, h, h, device=device)
    x = torch.randn(b, 4, h, h, device=device) * (1 + s * s) ** 0.5
    x0 = torch.randn(b, 4, h, h, device=device)
    x_unet = x.to(dtype)
    ctx = torch.zeros(b, 77, 1024, device=device, dtype=dtype)
    t = torch.full((b,), 474, dtype=torch.long, device=device)
    noise = ilvr.DR2Noise(0, y.shape)
    latent_ref = ilvr.LatentRefiner(y, args.n_latent, "ddpm")
    pixel_ref = None
    if vae is not None:
        y_pix = torch.rand(b, 3, args.size, args.size, device=device)  # the codec's images are in [0, 1]
        pixel_ref = ilvr.PixelRefiner(y_pix, args.n_pixel, lambda z: codec.decode(vae, z),
                                      lambda im: codec.encode(vae, im).float(), "ddpm")

    def latent_step():
        _z, eps = noise.step(x)
        latent_ref(x, x0, eps, s_next)

    def pixel_step():
        _z, eps = noise.step(x)
        pixel_ref(x, x0, eps, s_next)

    names = ["unet", "latent_refinement", "ddpm_transition"] + (["pixel_refinement"] if pixel_ref is not None else [])
    rows = {k: [] for k in names}  # wall seconds
    cpu_rows = {k: [] for k in names}  # process CPU seconds

    def measure(name, fn):
        wall, cpu, _ = timed_cpu(fn, device)
        rows[name].append(wall)
        cpu_rows[name].append(cpu)

    z = torch.randn_like(x)
    warmup = 3 if device.type == "cuda" else 1
    with torch.no_grad():
        for _ in range(warmup):
            unet(x_unet, t, encoder_hidden_states=ctx)
            latent_step()
            ilvr.ancestral_step(x, x0, s, s_next, z, "ddpm")
            if pixel_ref is not None:
                pixel_step()
        for r in range(args.repeats):
            measure("unet", lambda: unet(x_unet, t, encoder_hidden_states=ctx))
            measure("latent_refinement", latent_step)
            measure("ddpm_transition", lambda: ilvr.ancestral_step(x, x0, s, s_next, z, "ddpm"))
            if pixel_ref is not None:
                measure("pixel_refinement", pixel_step)
            log.info("repeat %d/%d (wall / CPU s): unet %.3f / %.3f%s; load %.2f", r + 1, args.repeats,
                     rows["unet"][-1], cpu_rows["unet"][-1],
                     f", pixel refinement {rows['pixel_refinement'][-1]:.3f} / {cpu_rows['pixel_refinement'][-1]:.3f}"
                     if pixel_ref is not None else "", loadavg()[0])
    load_end = loadavg()

    on_cpu = device.type == "cpu"
    clock = "cpu" if on_cpu else "wall"
    med = {k: statistics.median(v) for k, v in rows.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_rows.items()}
    med_clock = med_cpu if on_cpu else med
    result = {
        "command": command("dr2.py", argv), "machine": machine(device), "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": b, "size": args.size, "n_latent": args.n_latent, "n_pixel": args.n_pixel,
        "threads": torch.get_num_threads(), "clock": clock, "times_s": rows, "cpu_times_s": cpu_rows,
        "median_s": med, "median_cpu_s": med_cpu,
        "ratio_to_unet": {k: med_clock[k] / med_clock["unet"] for k in med if k != "unet"},
        "ratio_to_unet_wall": {k: med[k] / med["unet"] for k in med if k != "unet"},
        "peak_rss_gb": peak_rss_gb(), "peak_memory_gib": peak_memory_gb(device),
        "loadavg_start": load_start, "loadavg_end": load_end,
    }
    print(f"DR2 per-step cost at {args.size} px, batch {b} ({result['machine']}, {result['dtype']}), "
          f"medians of {args.repeats}:")
    print(f"  {'component':<22}{'wall':>12}{'vs UNet':>12}" + (f"{'CPU':>12}{'vs UNet':>12}" if on_cpu else ""))
    for k, v in med.items():
        ratio = "" if k == "unet" else f"{100 * v / med['unet']:.3f} %"
        line = f"  {k:<22}{v * 1000:>10.2f}ms{ratio:>12}"
        if on_cpu:
            ratio = "" if k == "unet" else f"{100 * med_cpu[k] / med_cpu['unet']:.3f} %"
            line += f"{med_cpu[k] * 1000:>10.2f}ms{ratio:>12}"
        print(line)
    target = result["ratio_to_unet"]["latent_refinement"]
    print(f"latent refinement overhead {100 * target:.3f} % of a UNet step ({clock} clock; target <= 3 %): "
          f"{'OK' if target <= 0.03 else 'OVER'}")
    print(f"load average start {' '.join(f'{v:.2f}' for v in load_start)}, end "
          f"{' '.join(f'{v:.2f}' for v in load_end)}; peak RSS {result['peak_rss_gb']:.1f} GiB"
          + (f", peak GPU memory {result['peak_memory_gib']:.2f} GiB" if device.type == "cuda" else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if target <= 0.03 else 1


if __name__ == "__main__":
    sys.exit(main())
