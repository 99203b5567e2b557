"""The ``bfr`` command (:mod:`.main`), its folder entry points (:mod:`.folders`), the ComfyUI API client
(:mod:`.client`) and the UI -> API workflow conversion (:mod:`.workflow_format`).

Importing this package imports nothing heavy: ``comfyui_bfr.cli.client`` does not pull in the trainers."""
