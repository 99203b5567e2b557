"""Calibrate where dlib's 5 landmarks (eye corners + nose base) sit in the FFHQ 512 alignment frame.

dlib's 5-point predictor (face-recognition-models, CC0) gives the outer and inner corner of each eye and the point
under the nose, not the FFHQ/RetinaFace 5 points (eye centres, nose tip, mouth corners) that the FFHQ template uses.
To align with dlib points we need their positions in the template frame. Reference: the 68-point predictor (same
package; iBUG 300-W annotations, non-commercial, so used here for calibration only, never at run time) gives the FFHQ
semantics directly: eye centres = mean of each eye's 6 contour points, nose tip = point 30, mouth corners = 48 and 54.
For each real face (and its mirror image, which makes the template left/right symmetric), the 68-derived FFHQ points
are fitted to the FFHQ template by a least-squares similarity, and the dlib 5 points are mapped through that fit;
the template is their mean. Faces: the offline real photos in scikit-image (astronaut, camera).

Run: ``python bench/dlib5_template.py`` prints the template (paste it into pipelines/face_detect.py) and the
alignment error it gives on those faces. Needs ``pip install -e .[faces]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from comfyui_bfr.pipelines import face, face_detect  # noqa: E402


def main() -> None:
    import dlib
    from skimage import data

    models = face_detect.dlib_model_dir()
    p68 = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
    p5 = dlib.shape_predictor(str(models / face_detect.DLIB_FIVE_POINT))
    cnn = dlib.cnn_face_detection_model_v1(str(models / face_detect.DLIB_CNN))
    rows = []
    for name in ("astronaut", "camera"):
        img = getattr(data, name)()
        img = np.ascontiguousarray(np.stack([img] * 3, -1) if img.ndim == 2 else img)
        for flip in (False, True):
            im = np.ascontiguousarray(img[:, ::-1]) if flip else img
            rect = cnn(im, 0)[0].rect
            b = np.array([(p.x, p.y) for p in p68(im, rect).parts()], np.float64)
            a = np.array([(p.x, p.y) for p in p5(im, rect).parts()], np.float64)
            ffhq5 = np.stack([b[36:42].mean(0), b[42:48].mean(0), b[30], b[48], b[54]])
            # both predictors number points by image side (dlib point 0 is always the image-right eye's outer
            # corner, 68-point 36..41 always the image-left eye), so a mirrored face needs no reordering
            m = face.fit_similarity(ffhq5, face.template(512))
            rows.append((name, flip, face.apply_affine(m, a), ffhq5, a))
    tpl = np.mean([r[2] for r in rows], 0)
    print("DLIB5_TEMPLATE_512 =", np.round(tpl, 2).tolist())
    for name, flip, _, ffhq5, a in rows:
        m = face.fit_similarity(a, tpl)
        err = np.linalg.norm(face.apply_affine(m, ffhq5) - face.template(512), axis=1)
        m68 = face.fit_similarity(ffhq5, face.template(512))
        floor = np.linalg.norm(face.apply_affine(m68, ffhq5) - face.template(512), axis=1)
        print(f"{name:<10} flip={flip!s:<5} mean error dlib5 {err.mean():5.1f} px, 68-point fit itself "
              f"{floor.mean():5.1f} px (512 px crop)")


if __name__ == "__main__":
    main()
