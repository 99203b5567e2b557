"""Node family: CLR-Face's Identity Recovery Network (CLR-Face §3.3, design.md §3.5) — BFR Load CLR-Face IRN and
BFR CLR-Face IRN.

Thin adapters around :mod:`..lora.irn` (the network and its ``clrface-irn/1`` file) and :func:`..pipelines.irn.run_irn`.
The IRN's output x_id is an IMAGE like any restorer's: encode it into the CLR-Face sampler's latent_image (refinement
starts from E(x_id) noised to sigma_start) and connect it as the sampler's reference. The network runs under
ComfyUI's model management through a ModelPatcher (loaded to the torch device before the run, offloaded with the
rest); comfy is imported lazily.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..lora.checkpoint import CheckpointError
from ..lora.irn import IRN_FORMAT, IRNCheckpoint, load_irn_checkpoint, parameter_count
from ..pipelines.irn import run_irn
from ._comfy import BFR_FOLDER, check_interrupted, intermediate_device, model_files, progress_callback
from ._comfy import module_patcher, register_model_folder
from .clrface import CATEGORY
from .helpers import NodeInputError, check_megapixels, to_rgb

logger = logging.getLogger(__name__)

LOAD_ID = "BFR Load CLR-Face IRN"
IRN_ID = "BFR CLR-Face IRN"
MAX_MEGAPIXELS = 4.2  # default size guard per image: 2048 x 2048 faces pass (~1.4 TMAC each at that size)


@dataclass
class IRNHandle:
    """BFR_CLRFACE_IRN: a loaded ``clrface-irn/1`` file and the ModelPatcher ComfyUI manages it with (None outside
    ComfyUI)."""

    name: str
    checkpoint: IRNCheckpoint
    patcher: object | None = None

    @property
    def net(self):
        return self.checkpoint.net

    def __deepcopy__(self, memo):
        return self


def irn_handle(checkpoint: IRNCheckpoint, name: str | None = None) -> IRNHandle:
    """Wrap a loaded IRN for the graph: a ModelPatcher (ComfyUI's load / offload devices) when ComfyUI is there."""
    return IRNHandle(name or checkpoint.path.name, checkpoint, module_patcher(checkpoint.net))


def load_irn(path: str, node: str = LOAD_ID) -> IRNHandle:
    try:
        ckpt = load_irn_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as exc:
        raise NodeInputError(node, f"{exc} Pick a CLR-Face IRN (bfr_format {IRN_FORMAT}, written by `bfr train "
                                   "irn`) in models/bfr.") from exc
    return irn_handle(ckpt, os.path.basename(str(path)))


class BFRLoadCLRFaceIRN:
    """models/bfr/<file> (clrface-irn/1) -> BFR_CLRFACE_IRN."""

    DESCRIPTION = (
        "Loads CLR-Face's Identity Recovery Network f_phi (CLR-Face §3.3): a compact residual conv encoder-decoder "
        "trained by `bfr train irn` with Eq. 11 (alpha * L1 + the cosine distance of ArcFace embeddings) to recover "
        "the identity of degraded faces, from models/bfr. Connect it to 'BFR CLR-Face IRN'. Any other restorer's "
        "output can serve as x_id as well (DR2, FlipNet, DR-BFR, a face model); this is the paper's own chain.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("BFR_CLRFACE_IRN",)
    RETURN_NAMES = ("irn",)
    OUTPUT_TOOLTIPS = ("The IRN f_phi for BFR CLR-Face IRN.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"irn_name": (model_files(BFR_FOLDER), {
            "tooltip": f"A {IRN_FORMAT} .safetensors in models/bfr (from `bfr train irn`), e.g. irn.safetensors."})}}

    def load(self, irn_name):
        import folder_paths

        register_model_folder()
        path = folder_paths.get_full_path(BFR_FOLDER, irn_name)
        if path is None:
            raise NodeInputError(LOAD_ID, f"{irn_name!r} is not in models/bfr; put the IRN .safetensors there and "
                                          "refresh.")
        return (load_irn(path),)


class BFRCLRFaceIRN:
    """BFR_CLRFACE_IRN + IMAGE (degraded face crops) -> IMAGE x_id."""

    DESCRIPTION = (
        "Runs CLR-Face's Identity Recovery Network on degraded FFHQ-aligned face crops (Crop Faces output) and "
        "returns x_id, an estimate that recovers identity rather than sharp detail (CLR-Face §3.3). Use it as the "
        "CLR-Face sampler's reference and encode it into latent_image: refinement starts from E(x_id). Any size "
        "(padded inside the network and cropped back), batches in chunks of batch_size.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("x_id",)
    OUTPUT_TOOLTIPS = ("x_id = f_phi(image), same size as the input, in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "irn": ("BFR_CLRFACE_IRN", {"tooltip": "f_phi from BFR Load CLR-Face IRN."}),
                "image": ("IMAGE", {"tooltip": "Degraded FFHQ-aligned face crops in 0..1 (the IRN was trained on "
                                               "512 px crops); any size."}),
            },
            "optional": {
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 256,
                                       "tooltip": "Faces per network call (memory vs. speed)."}),
                "max_megapixels": ("FLOAT", {"default": MAX_MEGAPIXELS, "min": 0.01, "max": 64.0, "step": 0.1,
                                             "tooltip": "Size guard per image: crop faces first."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(self, irn, image, batch_size=4, max_megapixels=MAX_MEGAPIXELS, unique_id=None):
        if not isinstance(irn, IRNHandle):
            raise NodeInputError(IRN_ID, "irn must come from BFR Load CLR-Face IRN.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise NodeInputError(IRN_ID, f"batch_size must be an integer >= 1, got {batch_size!r}.")
        faces = to_rgb(IRN_ID, image, "image")
        check_megapixels(IRN_ID, faces, max_megapixels, "The IRN runs at full resolution.")
        if irn.patcher is not None:  # onto ComfyUI's torch device (offloaded again when memory is needed)
            import comfy.model_management as mm

            mm.load_models_gpu([irn.patcher])
        n = faces.shape[0]
        progress = progress_callback(n, unique_id)
        check_interrupted()
        out = run_irn(irn.net, faces.movedim(-1, 1), batch_size=batch_size, callback=progress)
        logger.info("[%s] %s (%d parameters): %d face(s) of %dx%d.", IRN_ID, irn.name, parameter_count(irn.net), n,
                    faces.shape[2], faces.shape[1])
        return (out.movedim(1, -1).to(intermediate_device()),)


NODE_CLASS_MAPPINGS = {"BFRLoadCLRFaceIRN": BFRLoadCLRFaceIRN, "BFRCLRFaceIRN": BFRCLRFaceIRN}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRLoadCLRFaceIRN": LOAD_ID, "BFRCLRFaceIRN": IRN_ID}
