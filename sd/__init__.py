"""SD2.1 plumbing every method shares: single-file <-> diffusers conversion (:mod:`.convert`), the one loader with
one lookup order (:mod:`.loader`), the VAE codec (:mod:`.vae`) and the diffusion math (:mod:`.diffusion`).

The bottom layer of the pack: imports nothing else from it and never imports comfy."""
