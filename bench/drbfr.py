"""DR-BFR UNet step vs a plain SD2.1 step, measured side by side in one run, beside the counted-FLOP ratio, and
E_DR's cost per image (design §7).

Full SD2.1-base topology with random weights (timing only; sd.convert's SD21_BASE_UNET_CONFIG, 866 M parameters),
512 px (64x64 latent), classifier-free guidance (1 image = UNet batch 2), 77 text tokens of width 1024; fp32 on
the CPU unless --device/--dtype say otherwise. The LoRA is not instantiated: in ComfyUI it is merged into the
weights at load time and costs nothing per step. Per repeat, interleaved so machine load hits both alike:

- plain: the stock UNet on ``z_t`` with the text context;
- drbfr: ``lora.ldrm.concat_unet_eps``: the pack's widened conv_in (ConcatConvIn over ``[z_t, E(y)]``, random
  non-zero W_extra) and the DR prompt (``DRPrompt``: MLP(t) + projection, l tokens appended to the context), i.e.
  exactly what a DR-BFR step runs in ComfyUI (the wrapper) and in the diffusers pipeline.

The compute bound of the change is the FLOP ratio counted on the warm-up call of each case
(torch.utils.flop_counter; common.count_flops), cross-checked analytically: the extra conv_in channels
(2 * 320 * k * 9 * h * w per row), the l extra keys/values of every cross-attention (2 * 2 * l * 1024 * C per layer
and row for to_k/to_v, 4 * heads * N * l * d for QK^T and AV) and the prompt's MLP/projection. E_DR runs once per
image (not per step): its time and FLOPs on a --size image are reported separately.

Run: ``python bench/drbfr.py --threads 1 --repeats 3`` (see --help); medians over --repeats.
"""

from __future__ import annotations

import json
import logging
import statistics
import time

import torch
from common import (build_sd21_unet, command, count_flops, device_dtype, loadavg, machine, n_params, peak_memory_gb,
                    require_pack, reset_peak_memory, setup_logging, timed_cpu, unet_bench_parser)

ldrm, dr_module = require_pack("lora.ldrm", "lora.dr_module")


def analytic_extra_flops(unet, rows: int, h: int, k: int, l_tokens: int, n_text: int) -> dict[str, int]:
    """FLOPs the DR-BFR step adds to a plain step, from the layer shapes (multiply-add = 2)."""
    conv = 2 * unet.conv_in.out_channels * k * 9 * h * h * rows
    kv = attn = 0
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            c = mod.to_q.out_features
            kv += 2 * 2 * l_tokens * mod.to_k.in_features * c * rows  # to_k, to_v on the l extra tokens
            n_q = _tokens[name]
            attn += 2 * 2 * n_q * l_tokens * c * rows  # QK^T and AV over the l extra keys (all heads: C = H * d)
    return {"conv_in": conv, "attn2_kv": kv, "attn2_core": attn}


_tokens: dict[str, int] = {}


def main(argv=None) -> int:
    ap = unet_bench_parser(__doc__, batch_help="images per step (CFG doubles it: 1 image = UNet batch 2)", repeats=3,
                           threads=1, threads_help="torch threads (1: the CPU clock then counts work, not waits)")
    ap.add_argument("--tokens", type=int, default=4, help="DR tokens l (E_DR's pooling grid g^2; default 4)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None, help="clock of the ratio (default: cpu on the "
                    "CPU, wall on CUDA)")
    args = ap.parse_args(argv)
    setup_logging()
    log = logging.getLogger("bench.drbfr")
    device, dtype = device_dtype(args)
    torch.set_num_threads(args.threads)
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    load_start = loadavg()
    unet = build_sd21_unet(device=device, dtype=dtype)
    stock_conv = unet.conv_in
    g = torch.Generator().manual_seed(0)
    w_extra = (torch.randn(stock_conv.out_channels, 4, 3, 3, generator=g) * 0.02).to(device, dtype)
    wide_conv = ldrm.ConcatConvIn(stock_conv, 4, w_extra)
    grid = int(round(args.tokens ** 0.5))
    dr_cfg = dr_module.DRConfig(num_tokens=grid * grid)
    prompt = ldrm.DRPrompt(ldrm.DRPromptConfig(token_dim=dr_cfg.token_dim, num_tokens=dr_cfg.num_tokens)).to(device,
                                                                                                            dtype)
    encoder = dr_module.DegradationEncoder(dr_cfg).to(device, dtype).eval()

    b, h = args.batch, args.size // 8
    rows = 2 * b
    like = {"device": device, "dtype": dtype}
    z = torch.randn(rows, 4, h, h, **like)
    lq = torch.randn(b, 4, h, h, **like).repeat(2, 1, 1, 1)
    ctx = torch.randn(rows, 77, 1024, **like)
    f_dr = torch.randn(b, dr_cfg.num_tokens, dr_cfg.token_dim, **like).repeat(2, 1, 1)
    tt = torch.full((rows,), 501, device=device)
    image = torch.rand(b, 3, args.size, args.size, **like)

    def plain():
        unet.conv_in = stock_conv
        return unet(z, tt, encoder_hidden_states=ctx).sample

    def drbfr():
        unet.conv_in = wide_conv
        return ldrm.concat_unet_eps(unet, z, tt, ctx, lq, prompt, f_dr)

    def dr_encoder():
        return encoder(image)

    def shape_hook(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            _tokens.setdefault(name, int(x.shape[1]))  # returns None: the call's arguments stay as they are
        return hook

    hooks = [m.register_forward_pre_hook(shape_hook(n), with_kwargs=True)
             for n, m in unet.named_modules() if n.endswith("attn2")]
    fns = {"plain": plain, "drbfr": drbfr}
    flops = {}
    reset_peak_memory(device)
    with torch.no_grad():
        for name, fn in fns.items():
            flops[name], _, _ = count_flops(fn)
        for hk in hooks:
            hk.remove()
        flops["dr_encoder"], _, _ = count_flops(dr_encoder)
        times = {name: [] for name in fns}
        for r in range(args.repeats):
            for name, fn in fns.items():
                wall, cpu, _ = timed_cpu(fn, device)
                times[name].append(wall if clock == "wall" else cpu)
            log.info("repeat %d: %s", r + 1, ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        enc_times = [timed_cpu(dr_encoder, device)[0 if clock == "wall" else 1] for _ in range(args.repeats)]
    unet.conv_in = stock_conv
    med = {k: statistics.median(v) for k, v in times.items()}
    analytic = analytic_extra_flops(unet, rows, h, 4, dr_cfg.num_tokens, 77)
    prompt_flops = count_flops(lambda: prompt(f_dr, tt))[0]
    result = {
        "command": command("bench/drbfr.py", argv), "machine": machine(device), "clock": clock,
        "load_average_start": load_start, "load_average_end": loadavg(), "unet_params_M": n_params(unet) / 1e6,
        "batch_rows": rows, "size": args.size, "dr_tokens": dr_cfg.num_tokens, "dtype": str(dtype),
        "median_s": med, "ratio": med["drbfr"] / med["plain"],
        "flops_G": {k: v / 1e9 for k, v in flops.items()}, "flop_ratio": flops["drbfr"] / flops["plain"],
        "analytic_extra_G": {k: v / 1e9 for k, v in analytic.items()}, "prompt_G": prompt_flops / 1e9,
        "counted_extra_G": (flops["drbfr"] - flops["plain"]) / 1e9,
        "dr_encoder_s_per_image": statistics.median(enc_times) / b, "dr_encoder_params_M": n_params(encoder) / 1e6,
        "peak_memory_GiB": peak_memory_gb(device), "repeats": times, "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    result["gap_pct"] = 100 * (result["ratio"] / result["flop_ratio"] - 1)
    log.info(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
