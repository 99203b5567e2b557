"""Node family: identity you can see in the graph — BFR Identity Score (two IMAGEs -> similarity + report).

Thin wrapper over :mod:`..pipelines.identity` (the offline dlib face descriptor; no download). Put it next to any
restorer to see identity drift: restored vs input face, per image pair.
"""

from __future__ import annotations

import logging

import numpy as np

from ..pipelines import identity
from .helpers import NodeInputError, to_rgb

logger = logging.getLogger(__name__)

SCORE_ID = "BFR Identity Score"


class BFRIdentityScore:
    """Two IMAGE batches -> mean cosine similarity, mean angle (degrees) and a per-pair report."""

    DESCRIPTION = (
        "How much a restorer changed who the person is: the dlib face descriptor (offline, CPU; pip install "
        "'comfyui-bfr[faces]') of each face in image_a and image_b, compared pair by pair. Outputs the mean cosine "
        "similarity, the mean angle in degrees and a report per pair with the dlib distance (< 0.6 = same person by "
        "dlib's threshold). Use aligned=true for Crop Faces crops (no detection runs)."
    )
    CATEGORY = "BFR/faces"
    FUNCTION = "score"
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("cosine", "angle_degrees", "report")
    OUTPUT_TOOLTIPS = ("Mean cosine similarity of the face descriptors over the pairs (1 = identical).",
                       "Mean angle between the descriptors, degrees (0 = identical).",
                       "Per pair: cosine, angle, dlib distance and verdict; the backend and its weight files.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_a": ("IMAGE", {"tooltip": "E.g. the input faces (a batch is compared pair by pair)."}),
            "image_b": ("IMAGE", {"tooltip": "E.g. the restored faces; batch 1 is compared with every image_a."}),
            "aligned": ("BOOLEAN", {"default": True,
                                    "tooltip": "true: FFHQ-aligned crops (Crop Faces output), the whole crop is the "
                                               "face; false: find the largest face in each image."}),
        }}

    def score(self, image_a, image_b, aligned):
        a, b = to_rgb(SCORE_ID, image_a, "image_a"), to_rgb(SCORE_ID, image_b, "image_b")
        if b.shape[0] not in (1, a.shape[0]):
            raise NodeInputError(SCORE_ID, f"image_a has {a.shape[0]} images, image_b {b.shape[0]}: give equal "
                                           "batches, or one image_b for all.")
        try:
            judge = identity.DlibIdentity()
            emb_b = [judge.embed(x.numpy(), aligned=aligned) for x in b]
            emb_a = [judge.embed(x.numpy(), aligned=aligned) for x in a]
        except identity.NoFaceError as exc:
            raise NodeInputError(SCORE_ID, f"{exc}. With whole photos, set aligned=false; with crops from another "
                                           "source, align them first (Detect Faces -> Crop Faces).") from exc
        except identity.IdentityModelError as exc:
            raise NodeInputError(SCORE_ID, str(exc)) from exc
        lines, cosines, angles = [], [], []
        for i, ea in enumerate(emb_a):
            eb = emb_b[i if len(emb_b) > 1 else 0]
            cos, ang, dist = identity.cosine(ea, eb), identity.angle_degrees(ea, eb), identity.distance(ea, eb)
            cosines.append(cos)
            angles.append(ang)
            verdict = "same person" if dist < identity.SAME_PERSON_THRESHOLD else "different person"
            lines.append(f"pair {i}: cosine {cos:.4f}, angle {ang:.2f} deg, dlib distance {dist:.3f} ({verdict} "
                         f"by dlib's {identity.SAME_PERSON_THRESHOLD} threshold)")
        files = ", ".join(f"{w['file'].rsplit('/', 1)[-1]} sha256 {w['sha256'][:12]}" for w in judge.weights_info())
        lines.append(f"backend: dlib face descriptor ({files})")
        report = "\n".join(lines)
        logger.info("[%s] %s", SCORE_ID, report.replace("\n", "; "))
        return float(np.mean(cosines)), float(np.mean(angles)), report


NODE_CLASS_MAPPINGS = {"BFRIdentityScore": BFRIdentityScore}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRIdentityScore": SCORE_ID}
