"""Node family: whole photos (design.md §3.6) — Detect Faces -> Crop Faces -> any restorer -> Paste Faces.

Thin wrappers over :mod:`..pipelines.face` / :mod:`..pipelines.face_detect` (the CLI calls the same functions).
A BFR_FACES value (:class:`..pipelines.face.FaceSet`) carries the selected faces between the nodes, so any node
that maps a batch of aligned crops to a batch of restored crops (DR2, FlipNet, a core upscale/face model loaded by
spandrel, ...) sits between Crop and Paste. A photo without a face is never an error: Crop then passes one
placeholder crop (so the restorer between runs and the queue goes on), and Paste returns the photo unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..pipelines import face, face_detect, face_parsing, photo
from ._comfy import FACE_FOLDER, folder_dirs, intermediate_device, model_files, progress_callback, torch_device
from .helpers import NodeInputError, to_rgb

logger = logging.getLogger(__name__)

DETECT_ID = "BFR Detect Faces"
CROP_ID = "BFR Crop Faces"
PASTE_ID = "BFR Paste Faces"
FACES_TYPE = "BFR_FACES"
NO_PARSING = "none"
COLOR_FIXES = ("wavelet", "adain", "none")
# Without a face Crop passes one crop this small (the photo letterboxed), so the restorer in between costs ~nothing
PLACEHOLDER_PX = 64


def _photos(node: str, image, name: str = "image") -> tuple[torch.Tensor, list[np.ndarray]]:
    """IMAGE -> (checked RGB batch, per-photo float32 numpy (H, W, 3))."""
    rgb = to_rgb(node, image, name)
    return rgb, [p.numpy() for p in rgb.detach().cpu().float()]


def _check_faces(node: str, faces) -> face.FaceSet:
    if not isinstance(faces, face.FaceSet):
        raise NodeInputError(node, f"faces must be the BFR_FACES output of {DETECT_ID} (got {type(faces).__name__}).")
    return faces


def _check_sizes(node: str, faces: face.FaceSet, photos: list[np.ndarray]) -> None:
    sizes = tuple(p.shape[:2] for p in photos)
    if sizes != faces.image_sizes:
        raise NodeInputError(node, f"the image ({len(sizes)} photo(s), {[f'{w}x{h}' for h, w in sizes]}) is not the "
                                   f"one the faces were detected on ({len(faces.image_sizes)} photo(s), "
                                   f"{[f'{w}x{h}' for h, w in faces.image_sizes]}). Connect the same IMAGE to "
                                   f"{DETECT_ID} and to this node.")


def _mask_list(node: str, mask, photos: list[np.ndarray]) -> list[np.ndarray]:
    if mask is None:
        return []
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise NodeInputError(node, f"mask must be a MASK (B,H,W) (got shape {tuple(m.shape)}).")
    if m.shape[0] not in (1, len(photos)):
        raise NodeInputError(node, f"mask has {m.shape[0]} masks for {len(photos)} photos; give one mask, or one "
                                   "per photo.")
    return [x.numpy() for x in m.detach().cpu().float()]


class BFRDetectFaces:
    """IMAGE -> BFR_FACES (selected, aligned faces) + a numbered preview + a report."""

    DESCRIPTION = (
        "Finds faces and their 5 landmarks in whole photos, numbers them in a fixed order, keeps the ones you select "
        "and aligns each to the FFHQ 512 template. Backends: RetinaFace (ResNet-50 / MobileNet-0.25 files in "
        "models/facedetection, the ones facerestore_cf / CodeFormer use) or dlib (offline CPU; pip install "
        "'comfyui-bfr[faces]'). The preview shows every face with its number (green = selected). A photo without a "
        "face is not an error: the rest of the graph passes it through unchanged."
    )
    CATEGORY = "BFR/faces"
    FUNCTION = "detect"
    RETURN_TYPES = (FACES_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("faces", "preview", "report")
    OUTPUT_TOOLTIPS = (
        "The selected faces (boxes, landmarks, alignment transforms) for Crop Faces and Paste Faces.",
        "The photos with every detected face boxed and numbered (green = selected, grey = not).",
        "What was found and selected, per photo.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Whole photos (a batch is fine)."}),
                "backend": (list(face_detect.BACKENDS), {
                    "default": "auto",
                    "tooltip": "auto = RetinaFace ResNet-50 if detection_Resnet50_Final.pth is in "
                               "models/facedetection, else MobileNet-0.25 if present, else dlib CNN."}),
                "selection": (list(face.SELECTIONS), {
                    "default": "all",
                    "tooltip": "all / largest / center (closest to the photo centre) / index (the numbers below) / "
                               "mask (faces whose centre lies in the MASK)."}),
                "indices": ("STRING", {"default": "0", "tooltip": "selection=index: face numbers as on the "
                                                                  "preview, e.g. '0,2'."}),
                "order": (list(face.ORDERS), {"default": "area",
                                              "tooltip": "How faces are numbered: area = largest first; "
                                                         "left_to_right = by box centre. The same photo always "
                                                         "gives the same numbers."}),
                "min_size": ("INT", {"default": 32, "min": 0, "max": 8192,
                                     "tooltip": "Ignore faces whose box is smaller than this (px, shorter side)."}),
                "max_faces": ("INT", {"default": 0, "min": 0, "max": 1000,
                                      "tooltip": "Keep at most this many per photo, in order (0 = no limit)."}),
                "score_threshold": ("FLOAT", {
                    "default": -1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "Detector score needed to count as a face, in the backend's own units (RetinaFace: "
                               "probability; dlib: confidence). -1 = the backend's default (0.8 / 0.3)."}),
                "max_side": ("INT", {"default": face_detect.DEFAULT_MAX_SIDE, "min": 64, "max": 16384,
                                     "tooltip": "Photos larger than this are detected on a downscaled copy (bounded "
                                                "time and memory); boxes are mapped back to full resolution."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "selection=mask: paint over the faces to keep."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, selection=None, indices=None, **_):
        if selection == "index" and indices is not None:
            try:
                face.parse_indices(str(indices))
            except face.FaceSelectionError as exc:
                return f"[{DETECT_ID}] {exc}"
        return True

    def detect(self, image, backend, selection, indices, order, min_size, max_faces, score_threshold, max_side,
               mask=None):
        _, photos = _photos(DETECT_ID, image)
        masks = _mask_list(DETECT_ID, mask, photos)
        try:
            idx = face.parse_indices(indices) if selection == "index" else []
            used, per_image = face_detect.detect_batch(
                photos, backend, folder_dirs(FACE_FOLDER), threshold=None if score_threshold == -1 else score_threshold,
                max_side=max_side, device=torch_device())
            faces = face.build_faceset(per_image, [p.shape[:2] for p in photos], selection, indices=idx,
                                       masks=masks, min_size=min_size, max_faces=max_faces, order=order,
                                       backend=used)
        except (face.FaceSelectionError, face_detect.FaceDetectorError) as exc:
            raise NodeInputError(DETECT_ID, str(exc)) from exc
        previews = []
        for i, (p, dets) in enumerate(zip(photos, per_image)):
            numbered = face.numbered_detections(dets, faces, i, min_size, order)
            message = None
            if not dets:
                message = "no face found"
            elif not any(selected for _, _, selected in numbered):
                message = "no face selected"
            previews.append(face.draw_faces(p, numbered, message))
        if not len(faces):
            logger.warning("[%s] no face selected in %d photo(s) (%s): the photos pass through unchanged",
                           DETECT_ID, len(photos), faces.backend)
        preview = torch.from_numpy(np.stack(previews)).to(intermediate_device())
        report = f"backend: {faces.backend}\n" + faces.report()
        logger.info("[%s] %s", DETECT_ID, report.replace("\n", "; "))
        return faces, preview, report


class BFRCropFaces:
    """IMAGE + BFR_FACES -> the aligned face crops as one IMAGE batch (one per selected face)."""

    DESCRIPTION = (
        "Cuts every selected face out of its photo, aligned to the FFHQ template (the input the restorers expect), "
        "as one batch in the order of the faces. Restore the batch with any node, then give it to Paste Faces. "
        "Without a selected face this outputs one small placeholder (the photo letterboxed to 64 px) so the graph "
        "still runs."
    )
    CATEGORY = "BFR/faces"
    FUNCTION = "crop"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("crops",)
    OUTPUT_TOOLTIPS = ("Aligned face crops, crop_size x crop_size, one per selected face.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The photos the faces were detected on."}),
            "faces": (FACES_TYPE, {"tooltip": f"From {DETECT_ID}."}),
            "crop_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                  "tooltip": "Side of the aligned crops (512 = the FFHQ / SD2.1-base size)."}),
        }}

    def crop(self, image, faces, crop_size):
        rgb, photos = _photos(CROP_ID, image)
        faces = _check_faces(CROP_ID, faces)
        _check_sizes(CROP_ID, faces, photos)
        if not len(faces):
            logger.warning("[%s] no face to crop: passing one small placeholder crop (Paste Faces will return the "
                           "photo unchanged)", CROP_ID)
            crops = _letterbox(rgb[:1], PLACEHOLDER_PX)
        else:
            crops = torch.from_numpy(face.crop_faces(photos, faces, crop_size))
        return (crops.to(intermediate_device()),)


def _letterbox(image: torch.Tensor, size: int) -> torch.Tensor:
    """(1,H,W,3) -> (1,size,size,3): the whole photo fitted in, padded with the crop border grey."""
    h, w = image.shape[1:3]
    s = size / max(h, w)
    nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
    small = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(nh, nw), mode="bilinear",
                                            antialias=True, align_corners=False).movedim(1, -1).clamp(0, 1)
    out = torch.tensor(face.BORDER_RGB, dtype=image.dtype).expand(1, size, size, 3).clone()
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[:, y0:y0 + nh, x0:x0 + nw] = small
    return out


_PARSERS: dict = {}


def _parsing_files() -> list[str]:
    return [NO_PARSING] + sorted(f for f in model_files(FACE_FOLDER) if Path(f).name.startswith("parsing_"))


def _parser(name: str):
    path = None
    for d in folder_dirs(FACE_FOLDER):
        if (Path(d) / name).is_file():
            path = Path(d) / name
            break
    if path is None:
        raise NodeInputError(PASTE_ID, f"parsing file {name!r} is not in models/{FACE_FOLDER} (looked in "
                                       f"{folder_dirs(FACE_FOLDER)}); choose 'none' or put the file there.")
    key = (str(path), str(torch_device()))
    if key not in _PARSERS:
        try:
            _PARSERS[key] = face_parsing.load_parser(path, device=torch_device())
        except face_parsing.FaceParsingWeightsError as exc:
            raise NodeInputError(PASTE_ID, str(exc)) from exc
    return _PARSERS[key]


class BFRPasteFaces:
    """Photos + restored crops + BFR_FACES -> the photos with the faces blended back in, + the paste MASK."""

    DESCRIPTION = (
        "Puts the restored crops back where they came from: inverse alignment, a soft feathered mask (edge grows "
        "with the face), optional face-parsing mask (parsing_parsenet.pth / parsing_bisenet.pth in "
        "models/facedetection), and a colour fix against the original face. Pixels outside the faces' masks are "
        "exactly the input's. Overlapping faces: face #0 ends on top."
    )
    CATEGORY = "BFR/faces"
    FUNCTION = "paste"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The photos with the restored faces.", "Where faces were pasted (the blend weights).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The original photos (the ones the faces were detected on)."}),
                "restored": ("IMAGE", {"tooltip": "The restored crops: the Crop Faces batch after a restorer "
                                                  "(any square size; e.g. 1024 after a 2x face model)."}),
                "faces": (FACES_TYPE, {"tooltip": f"From {DETECT_ID}."}),
                "feather": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                      "tooltip": "Width of the soft edge, relative to facexlib's sqrt(area)/20 "
                                                 "(0 = hard edge)."}),
                "color_fix": (list(COLOR_FIXES), {
                    "default": "wavelet",
                    "tooltip": "Match the restored face's colours to the original face before pasting: wavelet "
                               "(keep the restored details, take the original's low frequencies), adain "
                               "(per-channel mean/std), or none."}),
            },
            "optional": {
                "parsing": (_parsing_files(), {"default": NO_PARSING,
                                               "tooltip": "A face-parsing model to paste only face/hair-free "
                                                          "regions (skin, eyes, nose, mouth)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def paste(self, image, restored, faces, feather, color_fix, parsing=NO_PARSING, unique_id=None):
        if image is None or not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise NodeInputError(PASTE_ID, "image must be an IMAGE batch (B,H,W,C).")
        faces = _check_faces(PASTE_ID, faces)
        alpha = image[..., 3:4].detach().cpu().float() if image.shape[-1] == 4 else None
        _, photos = _photos(PASTE_ID, image)
        _check_sizes(PASTE_ID, faces, photos)
        if color_fix not in COLOR_FIXES:
            raise NodeInputError(PASTE_ID, f"color_fix must be one of {', '.join(COLOR_FIXES)} (got {color_fix!r}).")
        if not len(faces):
            logger.warning("[%s] no face to paste: the photos are returned unchanged", PASTE_ID)
            out = image.detach().cpu().float().clone()
            return out, torch.zeros(out.shape[:3])
        crops = to_rgb(PASTE_ID, restored, "restored")
        if crops.shape[0] != len(faces):
            raise NodeInputError(PASTE_ID, f"{crops.shape[0]} restored crops for {len(faces)} faces: connect the "
                                           "Crop Faces output through the restorer unchanged in number (one crop "
                                           "per face, same order).")
        if crops.shape[1] != crops.shape[2]:
            raise NodeInputError(PASTE_ID, f"restored crops are {crops.shape[2]}x{crops.shape[1]}; they must be "
                                           "square (the aligned crops, possibly upscaled).")
        parse = None
        if parsing and parsing != NO_PARSING:
            parser = _parser(parsing)

            def parse(fixed: np.ndarray) -> np.ndarray:
                x = torch.from_numpy(fixed).movedim(-1, 1).to(torch_device())
                return parser.face_mask(x).float().cpu().numpy()

        progress = progress_callback(len(faces), unique_id)
        outs, masks, _ = photo.fix_and_paste(photos, crops.cpu().numpy(), faces, color_fix=color_fix, feather=feather,
                                             parse=parse, on_face=progress)
        out = torch.from_numpy(np.stack(outs))
        if alpha is not None:
            out = torch.cat([out, alpha], -1)
        return out.to(intermediate_device()), torch.from_numpy(np.stack(masks)).to(intermediate_device())


NODE_CLASS_MAPPINGS = {"BFRDetectFaces": BFRDetectFaces, "BFRCropFaces": BFRCropFaces, "BFRPasteFaces": BFRPasteFaces}
NODE_DISPLAY_NAME_MAPPINGS = {"BFRDetectFaces": DETECT_ID, "BFRCropFaces": CROP_ID, "BFRPasteFaces": PASTE_ID}
