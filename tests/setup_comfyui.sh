#!/usr/bin/env bash
# Give a ComfyUI checkout ($COMFYUI_PATH) its own virtual environment for this pack's integration tests.
#
#   COMFYUI_PATH=/path/to/ComfyUI bash tests/setup_comfyui.sh
#   COMFYUI_PATH=/path/to/ComfyUI $COMFYUI_PATH/.venv/bin/python -m pytest tests/comfy
#
# Creates or reuses $COMFYUI_PATH/.venv and installs, with pip, exactly:
#   1. torch==2.14.1 torchvision==0.29.1 (ComfyUI imports torchvision at startup; a matching pair is needed;
#      on this project's machines pip takes both from local disk; they run on the CPU);
#   2. ComfyUI's requirements.txt, plus `requests` (imported by ComfyUI's frontend manager but missing from its
#      requirements), `pytest`, and this pack's dependencies (requirements.txt + accelerate, scipy, scikit-image);
#   3. the reference packages of the parity tests that are installed without their dependencies (NO_DEPS): pyiqa
#      (its MUSIQ network and create_metric need only what steps 1-2 install; its full list would add bitsandbytes,
#      datasets, facexlib, opencv-python next to the headless one, tensorboard, ...).
# Idempotent: a marker file in the venv records a hash of these inputs; when it matches, nothing is installed.
# It never downloads ComfyUI itself (CI reaches package registries only): get a checkout some other way.
# Environment: PYTHON (interpreter for a new venv, default python3), BFR_SETUP_FORCE=1 to reinstall.
set -euo pipefail

if [ -z "${COMFYUI_PATH:-}" ]; then
  echo "setup_comfyui.sh: set COMFYUI_PATH to a ComfyUI checkout (this script does not download ComfyUI)" >&2
  exit 2
fi
COMFY=$(cd "$COMFYUI_PATH" && pwd)
if [ ! -f "$COMFY/main.py" ] || [ ! -d "$COMFY/comfy" ] || [ ! -f "$COMFY/requirements.txt" ]; then
  echo "setup_comfyui.sh: $COMFY is not a ComfyUI checkout (needs main.py, comfy/, requirements.txt)" >&2
  exit 2
fi
PACK=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$COMFY/.venv"
PY="${PYTHON:-python3}"
MARKER="$VENV/.bfr-setup-done"

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
EXTRA=(requests pytest diffusers transformers peft safetensors kornia opencv-python-headless pillow numpy scipy
       scikit-image accelerate playwright dlib-bin face-recognition-models pytorch-fid
       open_clip_torch)
NO_DEPS=(pyiqa==0.1.16)  # pinned: without its dependency list, a newer release may import more

stamp() {
  {
    echo "bfr-setup v2"
    echo "${TORCH_PINS[*]}"
    echo "${EXTRA[*]}"
    echo "${NO_DEPS[*]}"
    cat "$COMFY/requirements.txt"
    [ -f "$PACK/requirements.txt" ] && cat "$PACK/requirements.txt"
  } | sha256sum | cut -d' ' -f1
}
STAMP=$(stamp)

if [ "${BFR_SETUP_FORCE:-0}" != 1 ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$STAMP" ] \
   && "$VENV/bin/python" -c "import torch, torchvision, comfy_kitchen, requests, pytest, diffusers" 2>/dev/null; then
  echo "setup_comfyui.sh: $VENV is ready (marker matches); nothing to do"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_comfyui.sh: creating $VENV with $("$PY" --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
quiet() { grep -v '^WARNING: Location' || true; }

echo "setup_comfyui.sh: installing ${TORCH_PINS[*]}"
"${PIP[@]}" "${TORCH_PINS[@]}" 2>&1 | quiet
echo "setup_comfyui.sh: installing ComfyUI's requirements.txt and the test/pack extras"
REQS=(-r "$COMFY/requirements.txt")
[ -f "$PACK/requirements.txt" ] && REQS+=(-r "$PACK/requirements.txt")
# Keep the torch pair fixed while resolving the rest.
"${PIP[@]}" "${TORCH_PINS[@]}" "${REQS[@]}" "${EXTRA[@]}" 2>&1 | quiet
echo "setup_comfyui.sh: installing ${NO_DEPS[*]} without dependencies"
"${PIP[@]}" --no-deps "${NO_DEPS[@]}" 2>&1 | quiet
"$VENV/bin/python" - <<'EOF'
import torch, torchvision, requests, pytest, diffusers, transformers  # noqa: F401
print(f"setup_comfyui.sh: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"diffusers {diffusers.__version__}, transformers {transformers.__version__}")
EOF
mkdir -p "$COMFY/custom_nodes"  # ComfyUI's default base directory needs it (the tests use their own base)
echo "$STAMP" > "$MARKER"
echo "setup_comfyui.sh: done in $(( $(date +%s) - start )) s"
