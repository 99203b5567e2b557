"""UI-format (LiteGraph) workflow -> API-format prompt, using node schemas from ``/object_info``.

ComfyUI converts in the frontend only (``app.graphToPrompt()``). This is an independent implementation of the
same rules for the cases our workflows use, so that (a) tests keep each shipped UI workflow and its API twin in
step, and (b) ``bfr run-workflow`` can queue a UI-format file: widget values are assigned positionally to the
node's widget inputs in schema order (required, then optional); an INT input declared with
``control_after_generate`` is followed by one frontend-only value; an input fed by a link becomes
``[source_node_id, slot]``. Muted (mode 2) and bypassed (mode 4) nodes are not supported and raise.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
_FRONTEND_ONLY_OPTIONS = ("control_after_generate", "image_upload")


class WorkflowFormatError(ValueError):
    """The workflow cannot be converted (unknown node type, missing link, unsupported mode...)."""


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    if isinstance(kind, list):
        return True
    return kind in WIDGET_TYPES


def _ordered_inputs(schema: dict) -> list[tuple[str, list]]:
    inputs = schema.get("input", {})
    order = schema.get("input_order")
    out = []
    for section in ("required", "optional"):
        names = order.get(section, []) if order else list(inputs.get(section, {}))
        for name in names:
            out.append((name, inputs.get(section, {})[name]))
    return out


def _widget_slots(name: str, spec: list) -> int:
    """How many ``widgets_values`` entries the frontend stores for this input (value + frontend-only extras)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    extra = 0
    if opts.get("control_after_generate"):
        extra += 1
    if opts.get("image_upload"):
        extra += 1
    return 1 + extra


def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow to an API prompt ``{id: {class_type, inputs, _meta}}``."""
    links = {}
    for link in workflow.get("links", []):
        link_id, src, src_slot, dst, dst_slot, _type = link[:6]
        links[link_id] = (str(src), int(src_slot))
    prompt: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if node.get("mode", 0) != 0:
            raise WorkflowFormatError(f"node {node['id']} ({ntype}) is muted or bypassed; unsupported here")
        if ntype in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
            if ntype in ("Reroute", "PrimitiveNode"):
                raise WorkflowFormatError(f"node {node['id']} is a {ntype}; not supported by this converter")
            continue
        schema = object_info.get(ntype)
        if schema is None:
            raise WorkflowFormatError(f"node {node['id']} has unknown type {ntype!r} (not in /object_info)")
        linked = {}
        for inp in node.get("inputs", []) or []:
            if inp.get("link") is not None:
                if inp["link"] not in links:
                    raise WorkflowFormatError(f"node {node['id']} input {inp['name']} uses missing link {inp['link']}")
                linked[inp["name"]] = list(links[inp["link"]])
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise WorkflowFormatError(f"node {node['id']} ({ntype}) stores widgets as a dict; unsupported")
        inputs: dict[str, Any] = {}
        pos = 0
        for name, spec in _ordered_inputs(schema):
            if _is_widget(spec):
                n = _widget_slots(name, spec)
                if pos < len(values):
                    inputs[name] = values[pos]
                pos += n
            if name in linked:
                inputs[name] = linked[name]
        if pos != len(values) and values:
            raise WorkflowFormatError(
                f"node {node['id']} ({ntype}) has {len(values)} widget values but its schema expects {pos}; "
                "the workflow was saved with a different version of the node")
        entry = {"class_type": ntype, "inputs": inputs}
        title = node.get("title")
        entry["_meta"] = {"title": title or object_info[ntype].get("display_name", ntype)}
        prompt[str(node["id"])] = entry
    return prompt


def comparable(prompt: dict) -> dict:
    """Strip ``_meta`` so two API prompts can be compared for equality."""
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def schema_from_node_class(cls) -> dict:
    """An ``/object_info``-like schema from a V1 node class (for tests without a running ComfyUI)."""
    it = cls.INPUT_TYPES()
    return {
        "input": {k: v for k, v in it.items() if k in ("required", "optional")},
        "input_order": {k: list(v) for k, v in it.items() if k in ("required", "optional")},
        "output": list(cls.RETURN_TYPES),
        "display_name": getattr(cls, "DISPLAY_NAME", None),
    }
