"""Node freeze: the live registry must equal tests/data/node_freeze.json.

The file pins, for every node id in ``comfyui_bfr.NODE_CLASS_MAPPINGS``: the display name, the category, the
RETURN_TYPES and every input in declaration order with its section (required / optional / hidden) and type
(combos as ``"COMBO"``; their choices are not pinned). Saved workflows and API prompts depend on exactly these:
UI workflows store widget values by position, API prompts by input name.

A change on purpose (a new node, a new input, a renamed one) is made by regenerating the file in the same change:

    python tests/test_node_freeze.py --update

Without ``--update`` the script prints the differences and exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

FREEZE_FILE = Path(__file__).resolve().parent / "data" / "node_freeze.json"
UPDATE_COMMAND = "python tests/test_node_freeze.py --update"
SECTIONS = ("required", "optional", "hidden")


def _input_type(spec) -> str:
    if isinstance(spec, str):  # hidden inputs: "UNIQUE_ID", "PROMPT", ...
        return spec
    kind = spec[0]
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def snapshot() -> dict:
    """{node_id: {display_name, category, return_types, inputs: [{name, section, type}, ...]}} of the registry."""
    from comfyui_bfr import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    nodes = {}
    for node_id in sorted(NODE_CLASS_MAPPINGS):
        cls = NODE_CLASS_MAPPINGS[node_id]
        types = cls.INPUT_TYPES()
        inputs = [{"name": name, "section": section, "type": _input_type(spec)}
                  for section in SECTIONS for name, spec in (types.get(section) or {}).items()]
        nodes[node_id] = {"display_name": NODE_DISPLAY_NAME_MAPPINGS.get(node_id), "category": cls.CATEGORY,
                          "return_types": list(cls.RETURN_TYPES), "inputs": inputs}
    return nodes


def load() -> dict:
    return json.loads(FREEZE_FILE.read_text())["nodes"]


def write(nodes: dict) -> None:
    doc = {"_comment": f"Node ids, display names, categories, outputs and inputs of the pack, pinned. Regenerate "
                       f"on purpose with: {UPDATE_COMMAND}", "nodes": nodes}
    FREEZE_FILE.parent.mkdir(parents=True, exist_ok=True)
    FREEZE_FILE.write_text(json.dumps(doc, indent=1) + "\n")


def differences(frozen: dict, live: dict) -> list[str]:
    """Human-readable differences, one line each, naming the node id and input."""
    out = []
    for node_id in sorted(set(frozen) - set(live)):
        out.append(f"{node_id}: node removed (or its id renamed); saved workflows using it will not load")
    for node_id in sorted(set(live) - set(frozen)):
        out.append(f"{node_id}: new node, not in the freeze file")
    for node_id in sorted(set(frozen) & set(live)):
        old, new = frozen[node_id], live[node_id]
        for key in ("display_name", "category", "return_types"):
            if old.get(key) != new.get(key):
                out.append(f"{node_id}: {key} {old.get(key)!r} -> {new.get(key)!r}")
        old_in = {i["name"]: i for i in old.get("inputs", [])}
        new_in = {i["name"]: i for i in new.get("inputs", [])}
        for name in [n for n in old_in if n not in new_in]:
            out.append(f"{node_id}.{name}: input removed ({old_in[name]['section']} {old_in[name]['type']})")
        for name in [n for n in new_in if n not in old_in]:
            out.append(f"{node_id}.{name}: input added ({new_in[name]['section']} {new_in[name]['type']})")
        for name in [n for n in old_in if n in new_in]:
            for key in ("section", "type"):
                if old_in[name][key] != new_in[name][key]:
                    out.append(f"{node_id}.{name}: {key} {old_in[name][key]!r} -> {new_in[name][key]!r}")
        kept_old = [n for n in old_in if n in new_in]
        kept_new = [n for n in new_in if n in old_in]
        if kept_old != kept_new:
            out.append(f"{node_id}: input order {kept_old} -> {kept_new} (UI workflows store widget values by "
                       "position)")
    return out


def test_registry_matches_the_freeze_file():
    assert FREEZE_FILE.is_file(), f"{FREEZE_FILE} is missing; create it with: {UPDATE_COMMAND}"
    diff = differences(load(), snapshot())
    assert not diff, ("the node registry differs from tests/data/node_freeze.json:\n  " + "\n  ".join(diff)
                      + f"\nIf this is on purpose (it can break saved workflows and API prompts: update workflows/ "
                        f"and say so in the changelog), regenerate the file with: {UPDATE_COMMAND}")


def test_differences_name_the_node_and_input():
    live = snapshot()
    node_id = "BFRDR2Restore"
    assert node_id in live
    changed = copy.deepcopy(live)
    node = changed[node_id]
    node["inputs"][0]["type"] = "NOT_A_TYPE"
    first = node["inputs"][0]["name"]
    node["inputs"].append({"name": "extra", "section": "optional", "type": "INT"})
    node["category"] = "BFR/Elsewhere"
    diff = differences(live, changed)
    assert f"{node_id}.{first}: type {live[node_id]['inputs'][0]['type']!r} -> 'NOT_A_TYPE'" in diff
    assert f"{node_id}.extra: input added (optional INT)" in diff
    assert any(line.startswith(f"{node_id}: category") for line in diff)
    swapped = copy.deepcopy(live)
    swapped[node_id]["inputs"][:2] = swapped[node_id]["inputs"][1::-1]
    assert any("input order" in line for line in differences(live, swapped))
    del swapped[node_id]
    assert f"{node_id}: node removed (or its id renamed); saved workflows using it will not load" in \
        differences(live, swapped)


def test_combo_choices_are_not_pinned():
    restore = {i["name"]: i for i in snapshot()["BFRDR2Restore"]["inputs"]}
    assert restore["space"]["type"] == "COMBO" and restore["omega_mode"]["type"] == "COMBO"
    assert restore["unique_id"] == {"name": "unique_id", "section": "hidden", "type": "UNIQUE_ID"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help=f"rewrite {FREEZE_FILE.name} from the registry")
    args = parser.parse_args(argv)
    live = snapshot()
    if args.update:
        write(live)
        print(f"wrote {FREEZE_FILE} ({len(live)} nodes)")  # noqa: T201 (command-line tool)
        return 0
    diff = differences(load(), live) if FREEZE_FILE.is_file() else ["freeze file missing"]
    for line in diff:
        print(line)  # noqa: T201
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
