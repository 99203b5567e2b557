"""CLR-Face: one guided Heun step vs one unguided step (issue 11), split into UNet / VAE decode / identity network,
forward and backward, measured side by side in one run beside the counted FLOPs; the guided fraction that keeps a
whole run under a cost budget; the decode of only the latent window the ArcFace template reads; peak memory.

Full topology, random weights (timing only): the SD2.1-base UNet (sd.convert's SD21_BASE_UNET_CONFIG, 866 M
parameters) with the conditional denoiser's widened conv_in (lora.ldrm.ConcatConvIn over [z_t, E(x^d)], random
non-zero W_extra), the SD AutoencoderKL decoder at full size, and the identity network iresnet --arch (default r50,
pipelines.arcface) with its FFHQ -> ArcFace template warp; the learnable mask f_M (lora.id_mask, default sizes).
512 px (64x64 latent), batch 1, CFG 1 (CLR-Face samples without CFG: one UNet row per image), null-prompt context
77x1024, fp32 on the CPU unless --device/--dtype say otherwise. The steps run the pack's own code:
pipelines.clrface.guided_heun over two Karras sigmas of a --steps run at denoise 0.5 (the middle step: two model
calls), with guidance None (unguided) or an IdentityGuidance (uniform scale 1, mask f_M), whose every call is
identity_gradient: decode z0_hat, f_arc forward, L_arc, one autograd.grad back to the latent.

Per repeat, interleaved (the same machine load hits every case): the unguided step, the guided step, and one
guidance call with the window decoder. Inside each step the parts are timed by wrappers around the denoiser, the
decoder and the identity network, and by two tensor hooks in the backward pass (on the decoded image: the identity
backward ends there; on the latent: the decode backward ends there), so the split is of the real step, not of a
re-run: unet, decode fwd, identity fwd (template warp + iresnet), identity bwd (+ the cosine loss), decode bwd,
mask f_M, the rest of the guidance call (mask application, bookkeeping). Both clocks are kept; the ratios use the
process CPU clock on the CPU (with 1 thread it counts work, not waits for a core) and the wall clock on CUDA.

FLOPs (torch.utils.flop_counter through common.count_flops; backward included, element-wise ops not counted):
counted on the warm-up, stage by stage (UNet call; decode fwd; identity fwd; identity bwd; decode bwd), with the
decoded image detached between the stages (the chain rule split is exact), for the full decode and each window.

Guided fraction: a --steps Heun run ending at sigma = 0 makes 2 * steps - 1 model calls; with T_u the UNet call
and T_g the guidance call (medians), guiding n calls costs (calls * T_u + n * T_g) / (calls * T_u) of an
unguided run, so the --budget (1.5x) allows n <= (budget - 1) * calls * T_u / T_g. Reported for "guide every k-th
step" (both calls of steps i with (steps - 1 - i) % k == 0, i.e. always the last, sharpest step).

Window decode ("decode at the identity model's resolution where possible"): the template warp of
IdentityModel.preprocess reads only the pixels where its gradient is non-zero (found by back-propagating through the
preprocessing alone); the window is that box in latent cells (rounded out) plus --window-margins latent cells, and
its decoder decodes only those latents and pads the image back to full size with grey (a drop-in Decoder for
IdentityGuidance: the gradient outside the window is zero). Against the full decode of the same z0_hat: the cosine
of the two latent gradients inside the window, the share of the full gradient's energy inside the window, the
cosine over the whole latent, and |L_win - L_full| / L_full. Random weights: the agreement says how far the decoder
mixes context into the window, for this random decoder only.

Peak memory: on the CPU, one child process per variant (unguided step, guided step, guided step with the window
decoder; --memory-child) builds the models, resets the peak (/proc/self/clear_refs 5 sets VmHWM to the current RSS),
runs one step and reports VmHWM (peak resident set, every allocator) and the RSS before the step (the weights). On
CUDA, torch.cuda.max_memory_allocated per variant in this process (reset before each).

Run: ``python bench/clrface.py --threads 1 --repeats 3 --json clrface.json`` (see --help); ``--size 64
--repeats 1`` is a smoke run of under a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (build_sd21_unet, build_sd21_vae, command, count_flops, device_dtype, loadavg, machine, n_params,
                    peak_memory_gb, require_pack, reset_peak_memory, rss_gb, setup_logging, sync, unet_bench_parser)

clrface, arcface, ldrm, id_mask, codec = require_pack("pipelines.clrface", "pipelines.arcface", "lora.ldrm",
                                                      "lora.id_mask", "sd.vae")

log = logging.getLogger("bench.clrface")
PARTS = ("unet", "decode_fwd", "identity_fwd", "identity_bwd", "decode_bwd", "mask", "guidance_rest")
GUIDANCE_PARTS = PARTS[1:]
VARIANTS = ("unguided", "guided", "guided_window")


# ------------------------------------------------------------------------------------------------ timing


class Recorder:
    """Accumulates (wall, CPU) seconds per part of the current step; :meth:`now` synchronises CUDA first."""

    def __init__(self, device):
        self.device = device
        self.parts: dict[str, list[float]] = {}
        self.calls: dict[str, int] = {}
        self.marks: dict[str, tuple[float, float]] = {}

    def reset(self) -> None:
        self.parts, self.calls, self.marks = {}, {}, {}

    def now(self) -> tuple[float, float]:
        sync(self.device)
        return time.perf_counter(), time.process_time()

    def add(self, part: str, since: tuple[float, float], until: tuple[float, float] | None = None) -> None:
        until = until or self.now()
        acc = self.parts.setdefault(part, [0.0, 0.0])
        acc[0] += until[0] - since[0]
        acc[1] += until[1] - since[1]
        self.calls[part] = self.calls.get(part, 0) + 1


def timed_denoiser(denoiser, rec: Recorder):
    def call(x, sigma):
        t0 = rec.now()
        out = denoiser(x, sigma)
        rec.add("unet", t0)
        return out
    return call


def timed_decoder(decode, rec: Recorder):
    """The decoder, timed forward; hooks mark the end of the identity backward (gradient reaches the image) and of
    the decode backward (gradient reaches the latent)."""

    def on_image_grad(grad):
        t = rec.now()
        rec.add("identity_bwd", rec.marks.pop("identity_fwd_end"), t)
        rec.marks["image_grad"] = t

    def on_latent_grad(grad):
        rec.add("decode_bwd", rec.marks.pop("image_grad"))

    def call(z):
        if z.requires_grad:
            z.register_hook(on_latent_grad)
        t0 = rec.now()
        img = decode(z)
        rec.add("decode_fwd", t0)
        if img.requires_grad:
            img.register_hook(on_image_grad)
        return img
    return call


class TimedIdentity:
    """An IdentityModel whose :meth:`embed` (template warp + iresnet forward) is timed."""

    def __init__(self, model, rec: Recorder):
        self.model, self.rec = model, rec

    def embed(self, faces, grad=False, align=None):
        t0 = self.rec.now()
        out = self.model.embed(faces, grad=grad, align=align)
        self.rec.marks["identity_fwd_end"] = t = self.rec.now()
        self.rec.add("identity_fwd", t0, t)
        return out


class TimedGuidance:
    """An IdentityGuidance call, timed as a whole (its parts come from the wrappers inside it)."""

    def __init__(self, guidance, rec: Recorder):
        self.guidance, self.rec = guidance, rec

    def __call__(self, x, sigma, denoised):
        t0 = self.rec.now()
        out = self.guidance(x, sigma, denoised)
        self.rec.add("guidance_total", t0)
        return out


def timed_mask(mask_net, rec: Recorder):
    def call(x, sigma):
        t0 = rec.now()
        out = clrface.latent_mask(mask_net, x, sigma)
        rec.add("mask", t0)
        return out
    return call


def finish_parts(rec: Recorder, total: tuple[float, float]) -> dict[str, list[float]]:
    """{part: [wall, cpu]} of one step or call, with guidance_rest = guidance_total - its timed parts and
    step_rest = total - UNet - guidance (Heun arithmetic, callbacks)."""
    parts = {k: list(v) for k, v in rec.parts.items()}
    if "guidance_total" in parts:
        inner = [sum(parts.get(p, [0.0, 0.0])[c] for p in GUIDANCE_PARTS[:-1]) for c in (0, 1)]
        parts["guidance_rest"] = [parts["guidance_total"][c] - inner[c] for c in (0, 1)]
    parts["total"] = list(total)
    used = [parts.get("unet", [0.0, 0.0])[c] + parts.get("guidance_total", [0.0, 0.0])[c] for c in (0, 1)]
    parts["step_rest"] = [total[c] - used[c] for c in (0, 1)]
    return parts


# ------------------------------------------------------------------------------------------------ the window


def split_gradient(z0_hat, decode, identity, reference) -> dict:
    """identity_gradient done stage by stage with the image detached between decoder and identity network (the
    same gradient by the chain rule), each stage under FlopCounterMode: FLOPs per stage, L_arc, the gradient."""
    with torch.inference_mode(False), torch.enable_grad():
        z = z0_hat.detach().clone().requires_grad_(True)
        f_dec, _, img = count_flops(lambda: decode(z))
        img_d = img.detach().requires_grad_(True)
        f_idf, _, loss = count_flops(lambda: clrface.identity_loss(img_d, identity, reference))
        f_idb, _, (g_img,) = count_flops(lambda: torch.autograd.grad(loss.sum(), img_d))
        f_decb, _, (g_z,) = count_flops(lambda: torch.autograd.grad(img, z, g_img))
    return {"flops": {"decode_fwd": f_dec, "identity_fwd": f_idf, "identity_bwd": f_idb, "decode_bwd": f_decb},
            "loss": loss.detach().float(), "grad": g_z.detach().float()}


def agreement(full: dict, win: dict, box) -> dict:
    r0, r1, c0, c1 = box
    gf, gw = full["grad"], win["grad"]
    inside_f, inside_w = gf[..., r0:r1, c0:c1].flatten(), gw[..., r0:r1, c0:c1].flatten()
    share = float(inside_f.pow(2).sum() / gf.pow(2).sum().clamp_min(1e-30))
    lf, lw = float(full["loss"].mean()), float(win["loss"].mean())
    return {"cos_in_window": float(F.cosine_similarity(inside_f, inside_w, dim=0)),
            "full_grad_energy_in_window": share,
            "cos_whole_latent": float(F.cosine_similarity(gf.flatten(), gw.flatten(), dim=0)),
            "l_arc_full": lf, "l_arc_window": lw, "l_arc_rel_diff": abs(lw - lf) / max(abs(lf), 1e-30),
            "grad_norm_ratio_in_window": float(inside_w.norm() / inside_f.norm().clamp_min(1e-30))}


# ------------------------------------------------------------------------------------------------ the run


def guided_calls(steps: int, k: int) -> int:
    """Model calls guided when every k-th step is (both calls of step i when (steps - 1 - i) % k == 0; the last
    step, an Euler step to sigma = 0, has one call)."""
    return sum((1 if i == steps - 1 else 2) for i in range(steps) if (steps - 1 - i) % k == 0)


def fraction_table(steps: int, t_unet: float, t_guid: dict[str, float], budget: float) -> dict:
    calls = 2 * steps - 1
    out = {"model_calls": calls, "budget": budget, "t_unet_s": t_unet, "t_guidance_s": t_guid, "by_decoder": {}}
    for name, tg in t_guid.items():
        n_max = (budget - 1.0) * calls * t_unet / tg
        ks = {k: 1.0 + guided_calls(steps, k) * tg / (calls * t_unet) for k in range(1, steps + 1)}
        k_min = next((k for k, r in ks.items() if r <= budget), None)
        out["by_decoder"][name] = {
            "full_run_ratio": 1.0 + tg / t_unet, "max_guided_calls": n_max, "max_fraction": min(1.0, n_max / calls),
            "k_min": k_min, "guided_calls_at_k_min": None if k_min is None else guided_calls(steps, k_min),
            "ratio_at_k_min": None if k_min is None else ks[k_min],
            "ratio_by_k": {k: ks[k] for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 40) if k <= steps}}
    return out


class Setup:
    """The models and inputs of a run."""

    def __init__(self, args, device, dtype):
        self.device, self.dtype, self.size = device, dtype, args.size
        self.h = args.size // 8
        self.unet = build_sd21_unet(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        stock = self.unet.conv_in
        w_extra = (torch.randn(stock.out_channels, 4, 3, 3, generator=g) * 0.02).to(device, dtype)
        self.unet.conv_in = ldrm.ConcatConvIn(stock, 4, w_extra)
        self.vae = build_sd21_vae(device=device, dtype=dtype)
        # frozen, as ComfyUI holds them: autograd computes the latent's gradient only
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        torch.manual_seed(0)
        with torch.device(device):
            net = arcface.build_iresnet(args.arch)
        self.identity = arcface.IdentityModel(net, device=device, dtype=dtype)
        self.mask_net = id_mask.IdentityMask().to(device).eval().requires_grad_(False)
        b, like = args.batch, {"device": device, "dtype": torch.float32}
        lq = torch.randn(b, 4, self.h, self.h, generator=g).to(**like)
        ctx = torch.zeros(1, 77, 1024)
        self.denoiser = clrface.diffusers_denoiser(self.unet, ctx, lq_latent=lq)
        table = clrface.sigmas_from_alphas_cumprod(clrface.sd_alphas_cumprod()).float()
        sig = clrface.start_sigmas(args.steps, 0.5, float(table[0]), float(table[-1]))
        i = args.steps // 2
        self.sigmas = sig[i:i + 2].clone()
        self.x = (torch.randn(b, 4, self.h, self.h, generator=g) * (1.0 + float(self.sigmas[0]) ** 2) ** 0.5).to(**like)
        # x_id: a smooth random picture (only its embedding is used: the reference of L_arc)
        x_id = F.interpolate(torch.rand(b, 3, max(2, args.size // 16), max(2, args.size // 16), generator=g),
                             size=(args.size, args.size), mode="bilinear", align_corners=False).to(device)
        self.reference = clrface.reference_embedding(self.identity, x_id)
        self.pixel_box = clrface.template_pixel_box(self.identity, args.size, args.size)

    def guidance(self, decode, rec: Recorder | None):
        identity = self.identity if rec is None else TimedIdentity(self.identity, rec)
        mask = (lambda x, s: clrface.latent_mask(self.mask_net, x, s)) if rec is None else timed_mask(self.mask_net,
                                                                                                        rec)
        dec = decode if rec is None else timed_decoder(decode, rec)
        g = clrface.IdentityGuidance(dec, identity, self.reference, 1.0, mask)
        return g if rec is None else TimedGuidance(g, rec)

    def full_decoder(self):
        return clrface.vae_decoder(self.vae)

    def window_decoder(self, margin: int):
        box = clrface.latent_window(self.pixel_box, (self.h, self.h), 8, margin)
        return box, clrface.window_decoder(clrface.vae_decoder(self.vae), box, (self.h, self.h), 8)


def memory_child(args) -> int:
    """One variant's step in this fresh process: RSS before (the weights), VmHWM over the step; one JSON line."""
    device, dtype = device_dtype(args)
    torch.set_num_threads(args.threads)
    s = Setup(args, device, dtype)
    if args.memory_child == "unguided":
        guidance = None
    else:
        dec = s.full_decoder() if args.memory_child == "guided" else s.window_decoder(args.window_margin)[1]
        guidance = s.guidance(dec, None)
    before = rss_gb()
    ok = reset_peak_memory(device)
    with torch.no_grad():
        clrface.guided_heun(s.denoiser, s.x, s.sigmas, guidance)
    print(json.dumps({"variant": args.memory_child, "rss_before_gib": before, "peak_gib": peak_memory_gb(device),
                      "peak_reset": ok, "rss_after_gib": rss_gb()}))
    return 0


def memory_children(args) -> dict:
    out = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", v, "--size", str(args.size), "--threads", str(args.threads),
               "--arch", args.arch, "--steps", str(args.steps), "--batch", str(args.batch), "--dtype", args.dtype,
               "--window-margin", str(args.window_margin)]
        log.info("peak memory, %s step, child process ...", v)
        p = subprocess.run(cmd, capture_output=True, text=True)  # noqa: S603 (our own script, our arguments)
        line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
        out[v] = json.loads(line) if p.returncode == 0 and line else {"error": f"rc {p.returncode}: {p.stderr[-500:]}"}
        if "peak_gib" in out[v]:
            out[v]["step_gib"] = out[v]["peak_gib"] - out[v]["rss_before_gib"]
    return out


def main(argv=None) -> int:
    ap = unet_bench_parser(__doc__, batch_help="images per step (CFG 1: UNet batch = images)", repeats=3, threads=1,
                           threads_help="torch threads (1: the CPU clock then counts work, not waits)")
    ap.add_argument("--arch", default="r50", help="identity network (iresnet r18/r34/r50/r100; random weights)")
    ap.add_argument("--steps", type=int, default=clrface.PAPER_STEPS, help="Heun steps of the whole run (paper 40)")
    ap.add_argument("--budget", type=float, default=1.5, help="cost budget of a guided run, x an unguided run")
    ap.add_argument("--window-margins", default="0,2,4", help="latent cells around the template window (agreement)")
    ap.add_argument("--window-margin", type=int, default=2, help="the margin timed in the repeats and memory runs")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes (CPU)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None, help="clock of the ratios (default: cpu on the "
                    "CPU, wall on CUDA)")
    ap.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    setup_logging()
    if args.memory_child:
        return memory_child(args)
    device, dtype = device_dtype(args)
    torch.set_num_threads(args.threads)
    on_cpu = device.type == "cpu"
    clock = args.clock or ("cpu" if on_cpu else "wall")
    ci = 1 if clock == "cpu" else 0
    load_start = loadavg()
    s = Setup(args, device, dtype)
    margins = sorted({int(m) for m in args.window_margins.split(",") if m.strip()} | {args.window_margin})
    boxes = {m: s.window_decoder(m) for m in margins}
    log.info("template window at %d px: pixel rows %d:%d, cols %d:%d; sigmas of the step %.4f -> %.4f",
             args.size, *s.pixel_box, *(float(v) for v in s.sigmas))

    # warm-up with FLOP counts, stage by stage; the full gradient and each window's
    with torch.no_grad():
        f_unet, _, z0_hat = count_flops(lambda: s.denoiser(s.x, s.sigmas[0]))
        f_mask, _, _ = count_flops(lambda: clrface.latent_mask(s.mask_net, s.x, s.sigmas[0]))
    log.info("warm-up: full decode + identity, forward and backward, FLOPs counted ...")
    full = split_gradient(z0_hat, s.full_decoder(), s.identity, s.reference)
    windows, agree = {}, {}
    for m in margins:
        box, dec = boxes[m]
        log.info("window margin %d: latent rows %d:%d, cols %d:%d ...", m, *box)
        windows[m] = split_gradient(z0_hat, dec, s.identity, s.reference)
        agree[m] = agreement(full, windows[m], box) | {"latent_box": box, "area_fraction":
                                                      (box[1] - box[0]) * (box[3] - box[2]) / s.h ** 2}
    flops = {"unet_call": f_unet, "mask_call": f_mask, **full["flops"]}
    guid_flops = sum(full["flops"].values()) + f_mask
    win_flops = {m: sum(w["flops"].values()) + f_mask for m, w in windows.items()}
    step_flops = {"unguided": 2 * f_unet, "guided": 2 * (f_unet + guid_flops),
                  "guided_window": 2 * (f_unet + win_flops[args.window_margin])}

    rec = Recorder(device)
    cases = {
        "unguided": lambda: clrface.guided_heun(timed_denoiser(s.denoiser, rec), s.x, s.sigmas, None),
        "guided": lambda: clrface.guided_heun(timed_denoiser(s.denoiser, rec), s.x, s.sigmas,
                                              s.guidance(s.full_decoder(), rec)),
        # one guidance call with the window decoder (a guided-window step = 2 UNet calls + 2 of these)
        "window_call": lambda: s.guidance(boxes[args.window_margin][1], rec)(s.x, s.sigmas[0], z0_hat),
    }
    runs = {k: [] for k in cases}
    outs = {}
    with torch.no_grad():
        for r in range(args.repeats):
            for name, fn in cases.items():
                rec.reset()
                t0 = rec.now()
                outs[name] = fn()
                t1 = rec.now()
                runs[name].append(finish_parts(rec, (t1[0] - t0[0], t1[1] - t0[1])))
            log.info("repeat %d/%d (wall / CPU s): %s; load %.2f", r + 1, args.repeats, ", ".join(
                f"{k} {v[-1]['total'][0]:.2f} / {v[-1]['total'][1]:.2f}" for k, v in runs.items()), loadavg()[0])
    load_end = loadavg()

    def med(case, part, c=ci):
        return statistics.median(run.get(part, [0.0, 0.0])[c] for run in runs[case])

    # per model call (medians)
    t_unet = statistics.median([run["unet"][ci] / 2 for run in runs["unguided"]]
                               + [run["unet"][ci] / 2 for run in runs["guided"]])
    per_call = {p: med("guided", p) / 2 for p in GUIDANCE_PARTS} | {"unet": t_unet}
    per_call["guidance_total"] = med("guided", "guidance_total") / 2
    win_call = {p: med("window_call", p) for p in GUIDANCE_PARTS + ("guidance_total",)}
    steps_t = {"unguided": med("unguided", "total"), "guided": med("guided", "total"),
               "guided_window_derived": 2 * t_unet + 2 * win_call["guidance_total"]}
    ratio = steps_t["guided"] / steps_t["unguided"]
    flop_ratio = step_flops["guided"] / step_flops["unguided"]
    frac = fraction_table(args.steps, t_unet, {"full": per_call["guidance_total"],
                                               f"window_m{args.window_margin}": win_call["guidance_total"]},
                          args.budget)
    peak = memory_children(args) if on_cpu and not args.no_memory else None
    if not on_cpu:  # CUDA: peak allocated per variant, in this process
        peak = {}
        with torch.no_grad():
            for v in VARIANTS:
                g = None if v == "unguided" else s.guidance(
                    s.full_decoder() if v == "guided" else boxes[args.window_margin][1], None)
                sync(device)
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated(device) / 1024 ** 3
                reset_peak_memory(device)
                clrface.guided_heun(s.denoiser, s.x, s.sigmas, g)
                sync(device)
                p = peak_memory_gb(device)
                peak[v] = {"allocated_before_gib": before, "peak_gib": p, "step_gib": p - before}

    result = {
        "command": command("clrface.py", argv), "machine": machine(device), "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "clock": clock, "threads": torch.get_num_threads(),
        "size": args.size, "batch": args.batch, "arch": args.arch, "steps_per_run": args.steps,
        "step_sigmas": [float(v) for v in s.sigmas], "params_M": {"unet": n_params(s.unet) / 1e6,
        "vae_decoder": n_params(s.vae.decoder) / 1e6 + n_params(s.vae.post_quant_conv) / 1e6,
        "identity": n_params(s.identity.net) / 1e6, "mask": n_params(s.mask_net) / 1e6},
        "flops": flops, "guidance_call_flops": guid_flops, "window_call_flops": win_flops, "step_flops": step_flops,
        "flop_ratio": flop_ratio, "median_s_per_call": per_call, "median_s_window_call": win_call,
        "median_s_step": steps_t, "ratio": ratio, "gap": ratio / flop_ratio - 1,
        "median_s_step_by_clock": {name: {k: med(k, "total", i) for k in ("unguided", "guided")}
                                   for i, name in enumerate(("wall", "cpu"))},
        "ratio_window_derived": steps_t["guided_window_derived"] / steps_t["unguided"],
        "flop_ratio_window": step_flops["guided_window"] / step_flops["unguided"],
        "fraction": frac, "template_pixel_box": s.pixel_box, "window": {str(m): a for m, a in agree.items()},
        "window_flops": {str(m): w["flops"] for m, w in windows.items()}, "window_margin_timed": args.window_margin,
        "peak_memory": peak, "runs": runs, "loadavg_start": load_start, "loadavg_end": load_end,
        "guided_minus_unguided_max_abs": float((outs["guided"] - outs["unguided"]).abs().max()),
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    report(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def report(r: dict, args) -> None:
    c, pc, fl = r["clock"], r["median_s_per_call"], r["flops"]
    t_u = pc["unet"]
    print(f"CLR-Face Heun step at {r['size']} px, batch {r['batch']}, CFG 1, identity {r['arch']} ({r['machine']}, "
          f"{r['dtype']}), medians of {args.repeats}, {c} clock; step sigmas {r['step_sigmas'][0]:.4f} -> "
          f"{r['step_sigmas'][1]:.4f}")
    print(f"  {'part (per model call)':<40}{'s':>9}{'x UNet':>9}{'GFLOP':>10}{'x UNet':>9}")
    rows = [("UNet (conditional denoiser)", "unet", "unet_call"), ("VAE decode, forward", "decode_fwd", "decode_fwd"),
            ("VAE decode, backward", "decode_bwd", "decode_bwd"),
            (f"identity {r['arch']} fwd (warp + net)", "identity_fwd", "identity_fwd"),
            (f"identity {r['arch']} bwd (+ loss)", "identity_bwd", "identity_bwd"), ("mask f_M", "mask", "mask_call"),
            ("rest of the guidance call", "guidance_rest", None),
            ("guidance call, total", "guidance_total", "__g")]
    for label, part, fk in rows:
        f = r["guidance_call_flops"] if fk == "__g" else (fl.get(fk, 0) if fk else 0)
        print(f"  {label:<40}{pc[part]:>9.3f}{pc[part] / t_u:>8.2f}x{f / 1e9:>10.1f}{f / fl['unet_call']:>8.2f}x")
    st = r["median_s_step"]
    print(f"  step: unguided {st['unguided']:.3f} s ({r['step_flops']['unguided'] / 1e9:.1f} GFLOP), guided "
          f"{st['guided']:.3f} s ({r['step_flops']['guided'] / 1e9:.1f} GFLOP): measured {r['ratio']:.2f}x, FLOPs "
          f"{r['flop_ratio']:.2f}x (gap {100 * r['gap']:+.1f} %); wall clock " + ", ".join(
              f"{k} {v:.3f} s" for k, v in r["median_s_step_by_clock"]["wall"].items()))
    m = r["window_margin_timed"]
    wc = r["median_s_window_call"]
    print(f"  window decode (margin {m}): guidance call {wc['guidance_total']:.3f} s vs full {pc['guidance_total']:.3f}"
          f" s ({wc['guidance_total'] / pc['guidance_total']:.2f}x; decode fwd {wc['decode_fwd']:.3f}, bwd "
          f"{wc['decode_bwd']:.3f}); guided-window step {st['guided_window_derived']:.3f} s = "
          f"{r['ratio_window_derived']:.2f}x unguided (FLOPs {r['flop_ratio_window']:.2f}x)")
    fr = r["fraction"]
    for name, d in fr["by_decoder"].items():
        k = (f"every k-th step from k = {d['k_min']} ({d['guided_calls_at_k_min']} calls, {d['ratio_at_k_min']:.3f}x)"
             if d["k_min"] else "no k fits")
        print(f"  {fr['model_calls']}-call run ({r['steps_per_run']} steps), {name} decode: fully guided "
              f"{d['full_run_ratio']:.2f}x; under {fr['budget']}x: at most {d['max_guided_calls']:.1f} guided calls "
              f"({100 * d['max_fraction']:.1f} %), {k}")
    print(f"  template window at {r['size']} px: pixels rows {r['template_pixel_box'][0]}:{r['template_pixel_box'][1]}"
          f", cols {r['template_pixel_box'][2]}:{r['template_pixel_box'][3]}")
    print(f"  {'margin':>8}{'latent box':>18}{'area':>7}{'dec GFLOP':>11}{'cos in win':>12}{'E_full in':>11}"
          f"{'cos all':>9}{'dL/L':>9}")
    for mk, a in r["window"].items():
        wf = r["window_flops"][mk]
        print(f"  {mk:>8}{str(tuple(a['latent_box'])):>18}{a['area_fraction']:>7.3f}"
              f"{(wf['decode_fwd'] + wf['decode_bwd']) / 1e9:>11.1f}{a['cos_in_window']:>12.4f}"
              f"{a['full_grad_energy_in_window']:>11.4f}{a['cos_whole_latent']:>9.4f}{a['l_arc_rel_diff']:>9.2e}")
    print(f"  (full decode fwd + bwd {(fl['decode_fwd'] + fl['decode_bwd']) / 1e9:.1f} GFLOP)")
    if r["peak_memory"]:
        print("  peak memory per variant: " + "; ".join(
            f"{v}: " + (f"peak {p['peak_gib']:.2f} GiB, step {p['step_gib']:+.2f} GiB" if "peak_gib" in p
                        else p.get("error", "?")) for v, p in r["peak_memory"].items()))
    print(f"  load average start {' '.join(f'{v:.2f}' for v in r['loadavg_start'])}, end "
          f"{' '.join(f'{v:.2f}' for v in r['loadavg_end'])}; max|guided - unguided| = "
          f"{r['guided_minus_unguided_max_abs']:.3g}")


if __name__ == "__main__":
    sys.exit(main())
