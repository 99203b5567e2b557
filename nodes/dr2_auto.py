"""DR-driven DR2 in ComfyUI: ``BFR Load DR Encoder`` (models/bfr, ``drbfr-dr/1``) -> BFR_DR_ENCODER, and
``DR2 Auto Params`` (IMAGE + BFR_DR_ENCODER + a calibration file -> N FLOAT, tau INT, omega INT), which wire into
the ``n`` / ``tau`` / ``omega`` inputs of BFR DR2 Restore / BFR DR2 Sigmas (:mod:`..pipelines.dr2_auto`)."""

from __future__ import annotations

import logging
import os

from ..lora.checkpoint import CheckpointError
from ..lora.dr_checkpoint import read_dr_checkpoint
from ..pipelines import dr2_auto
from ._comfy import BFR_FOLDER, model_files, register_model_folder
from .helpers import NodeInputError, to_rgb

logger = logging.getLogger(__name__)

CATEGORY = "BFR/DR2"
LOAD_ID = "BFR Load DR Encoder"
AUTO_ID = "BFR DR2 Auto Params"


class DREncoder:
    """What BFR_DR_ENCODER carries: E_DR (eval mode), its training patch size and the file name."""

    def __init__(self, encoder, patch_size: int, name: str):
        self.encoder, self.patch_size, self.name = encoder, int(patch_size), name


def _full_path(node: str, name: str, what: str) -> str:
    import folder_paths

    register_model_folder()
    path = folder_paths.get_full_path(BFR_FOLDER, name)
    if path is None:
        raise NodeInputError(node, f"{name!r} is not in models/bfr; put the {what} there (or in a 'bfr' entry of "
                                   "extra_model_paths.yaml) and refresh.")
    return path


def load_dr_encoder(path: str, node: str = LOAD_ID) -> DREncoder:
    """A ``drbfr-dr/1`` file -> :class:`DREncoder`; every problem is a NodeInputError naming the file."""
    try:
        module, meta = read_dr_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as exc:
        raise NodeInputError(node, f"{exc} Pick a DR encoder (bfr_format drbfr-dr/1, dr_encoder.safetensors from "
                                   "`bfr train dr-encoder`) in models/bfr.") from exc
    return DREncoder(module.float().encoder, int(meta["patch_size"]), os.path.basename(str(path)))


class BFRLoadDREncoder:
    """models/bfr/<file> -> BFR_DR_ENCODER."""

    DESCRIPTION = ("Loads DR-BFR's degradation encoder E_DR (dr_encoder.safetensors from `bfr train dr-encoder`, "
                   "bfr_format drbfr-dr/1) from models/bfr. Connect it to 'DR2 Auto Params' to let the encoder's "
                   "degradation representation choose DR2's N, tau and omega.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("BFR_DR_ENCODER",)
    RETURN_NAMES = ("dr_encoder",)
    OUTPUT_TOOLTIPS = ("The DR encoder E_DR for DR2 Auto Params.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dr_encoder_name": (model_files(BFR_FOLDER), {
            "tooltip": "DR encoder .safetensors in models/bfr (bfr_format drbfr-dr/1), e.g. dr_encoder.safetensors."})}}

    def load(self, dr_encoder_name):
        return (load_dr_encoder(_full_path(LOAD_ID, dr_encoder_name, "DR encoder .safetensors"), LOAD_ID),)


def auto_params(dr_encoder: DREncoder, image, calibration_path: str, node: str = AUTO_ID) -> tuple[float, int, int]:
    """(N, tau, omega) for an IMAGE batch (B,H,W,C): one choice from the batch's mean f_DR."""
    try:
        cal = dr2_auto.load_calibration(calibration_path)
    except (CheckpointError, FileNotFoundError) as exc:
        raise NodeInputError(node, f"{exc} Pick a calibration from `bfr calibrate-dr2` (bfr_format "
                                   f"{dr2_auto.AUTO_FORMAT}) in models/bfr.") from exc
    x = to_rgb(node, image).permute(0, 3, 1, 2)
    if min(x.shape[-2:]) < cal.patch_size:
        raise NodeInputError(node, f"the image is {x.shape[-1]}x{x.shape[-2]} px, smaller than the DR encoder's "
                                   f"{cal.patch_size} px patches; use the aligned face crop (e.g. 512 px).")
    try:
        (n, tau, omega), = dr2_auto.auto_params(cal, dr_encoder.encoder, x, per_image=False)
    except ValueError as exc:
        raise NodeInputError(node, str(exc)) from exc
    logger.info("DR2 Auto Params (%s, %s): N=%g tau=%d omega=%d", dr_encoder.name, os.path.basename(calibration_path),
                n, tau, omega)
    return n, tau, omega


class BFRDR2AutoParams:
    """IMAGE + BFR_DR_ENCODER + calibration -> N, tau, omega for the DR2 nodes."""

    DESCRIPTION = ("Chooses DR2's low-pass factor N, output level tau and start level omega for the input face from "
                   "its DR-BFR degradation representation: the calibration's nearest images (by f_DR) vote with the "
                   "DR2 fidelity they reached on each (N, tau). Wire the outputs into the n / tau / omega inputs of "
                   "BFR DR2 Restore or BFR DR2 Sigmas (convert those widgets to inputs). One choice per batch (mean "
                   "f_DR). Calibrate with `bfr calibrate-dr2`; omega = tau + T/4.")
    CATEGORY = CATEGORY
    FUNCTION = "choose"
    RETURN_TYPES = ("FLOAT", "INT", "INT")
    RETURN_NAMES = ("n", "tau", "omega")
    OUTPUT_TOOLTIPS = ("N, the low-pass factor (in the calibration's space: latent or pixel px).",
                       "tau, the output level of the respaced schedule.", "omega, the start level (tau + T/4).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The degraded face(s), aligned crops as for BFR DR2 Restore."}),
            "dr_encoder": ("BFR_DR_ENCODER", {"tooltip": "From BFR Load DR Encoder; the one the calibration used."}),
            "calibration_name": (model_files(BFR_FOLDER), {
                "tooltip": "A `bfr calibrate-dr2` file in models/bfr (bfr_format drbfr-dr2-auto/1)."}),
        }}

    def choose(self, image, dr_encoder, calibration_name):
        return auto_params(dr_encoder, image, _full_path(AUTO_ID, calibration_name, "calibration"))


NODE_CLASS_MAPPINGS = {"BFRLoadDREncoder": BFRLoadDREncoder, "BFRDR2AutoParams": BFRDR2AutoParams}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRLoadDREncoder": LOAD_ID, "BFRDR2AutoParams": AUTO_ID}
