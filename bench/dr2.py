"""DR2 refinement overhead per step vs the SD2.1-base UNet step, measured side by side in one run.

Full SD2.1-base topology with random weights (timing only): UNet2DConditionModel from lora.convert's
SD21_BASE_UNET_CONFIG (866 M parameters) and, for space=pixel, the SD AutoencoderKL (SD21_BASE_VAE_CONFIG).
Per repeat, interleaved so that machine load hits every component alike:

- unet: one eps_theta(x_t, t) call at batch B, 512 px (64x64 latent), null context (DR2 runs at CFG 1);
- latent refinement: what DR2 adds to a step in space=latent: the step's noise draws (z and eps, CPU generator)
  plus Eq. 10 (diffuse y to the level, Phi_N down/up, add) - ilvr.LatentRefiner;
- pixel refinement: space=pixel: decode x0-hat, Phi_N in pixels, re-encode, plus the latent noise part -
  ilvr.PixelRefiner;
- the DDPM transition itself (ilvr.ancestral_step) is reported for reference; every sampler has one.

Run: ``python bench/dr2.py`` (see --help); medians over --repeats, ratios = median component / median UNet.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_pack():
    try:
        import comfyui_bfr  # noqa: F401
    except ImportError:  # running from a checkout without `pip install -e .`
        import importlib.util

        spec = importlib.util.spec_from_file_location("comfyui_bfr", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_bfr"] = module
        spec.loader.exec_module(module)
    from comfyui_bfr.sd import convert
    from comfyui_bfr.pipelines import dr2, ilvr
    from comfyui_bfr.sd import diffusion

    return convert, dr2, ilvr


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1, help="images per UNet call (DR2 is unconditional: 1 image = 1)")
    ap.add_argument("--size", type=int, default=512, help="image size in px (latent = size/8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-latent", type=float, default=2.0, help="N for space=latent (latent px)")
    ap.add_argument("--n-pixel", type=float, default=16.0, help="N for space=pixel (image px)")
    ap.add_argument("--no-pixel", action="store_true", help="skip the VAE round trip (space=pixel)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("bench.dr2")
    if args.threads:
        torch.set_num_threads(args.threads)
    convert, dr2, ilvr = _import_pack()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_config(dict(convert.SD21_BASE_UNET_CONFIG)).eval()
    vae = None if args.no_pixel else AutoencoderKL.from_config(dict(convert.SD21_BASE_VAE_CONFIG)).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    log.info("built SD2.1-base UNet (%.0f M params)%s in %.0f s; torch %s, %d threads", n_params / 1e6,
             "" if vae is None else " + AutoencoderKL", time.perf_counter() - t0, torch.__version__,
             torch.get_num_threads())

    b, h = args.batch, args.size // 8
    sigmas = diffusion.sigmas_from_alphas_cumprod(diffusion.sd_alphas_cumprod())
    s, s_next = float(sigmas[474]), float(sigmas[464])  # one DR2 transition (tau=22 -> omega=47 range, T=100)
    y = torch.randn(b, 4, h, h)
    x = torch.randn(b, 4, h, h) * (1 + s * s) ** 0.5
    x0 = torch.randn(b, 4, h, h)
    ctx = torch.zeros(b, 77, 1024)
    t = torch.full((b,), 474, dtype=torch.long)
    noise = ilvr.DR2Noise(0, y.shape)
    latent_ref = ilvr.LatentRefiner(y, args.n_latent, "ddpm")
    pixel_ref = None
    if vae is not None:
        y_pix = torch.rand(b, 3, args.size, args.size) * 2 - 1
        pixel_ref = ilvr.PixelRefiner(y_pix, args.n_pixel, lambda z: dr2.decode(vae, z),
                                      lambda im: dr2.encode(vae, im), "ddpm")

    def latent_step():
        _z, eps = noise.step(x)
        latent_ref(x, x0, eps, s_next)

    def pixel_step():
        _z, eps = noise.step(x)
        pixel_ref(x, x0, eps, s_next)

    rows = {"unet": [], "latent_refinement": [], "ddpm_transition": []}
    if pixel_ref is not None:
        rows["pixel_refinement"] = []
    z = torch.randn_like(x)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)  # warm-up
        latent_step()
        if pixel_ref is not None:
            pixel_step()
        for r in range(args.repeats):
            rows["unet"].append(timed(lambda: unet(x, t, encoder_hidden_states=ctx)))
            rows["latent_refinement"].append(timed(latent_step))
            rows["ddpm_transition"].append(timed(lambda: ilvr.ancestral_step(x, x0, s, s_next, z, "ddpm")))
            if pixel_ref is not None:
                rows["pixel_refinement"].append(timed(pixel_step))
            log.info("repeat %d/%d: unet %.2f s", r + 1, args.repeats, rows["unet"][-1])

    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "command": "python bench/dr2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads".strip(),
        "batch": b, "size": args.size, "n_latent": args.n_latent, "n_pixel": args.n_pixel,
        "median_s": med, "ratio_to_unet": {k: med[k] / med["unet"] for k in med if k != "unet"},
        "peak_rss_gb": peak_rss_gb(),
    }
    print(f"DR2 per-step cost at {args.size} px, batch {b} ({result['machine']}), medians of {args.repeats}:")
    print(f"  {'component':<22}{'median':>12}{'vs UNet':>12}")
    for k, v in med.items():
        ratio = "" if k == "unet" else f"{100 * v / med['unet']:.3f} %"
        print(f"  {k:<22}{v * 1000:>10.2f}ms{ratio:>12}")
    target = result["ratio_to_unet"]["latent_refinement"]
    print(f"latent refinement overhead {100 * target:.3f} % of a UNet step (target <= 3 %): "
          f"{'OK' if target <= 0.03 else 'OVER'}")
    print(f"peak RSS {result['peak_rss_gb']:.1f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if target <= 0.03 else 1


if __name__ == "__main__":
    sys.exit(main())
