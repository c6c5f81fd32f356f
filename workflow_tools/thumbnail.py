"""The Templates browser's thumbnail of a shipped workflow: a drawing of its graph (groups, nodes with
their titles, links), made from the UI workflow itself, so it shows honestly what the workflow is and
never an image presented as its output. The frontend (1.35.9) asks for `<workflow name>.jpg` beside
the .json in the pack's workflows folder."""
from __future__ import annotations

import io
from typing import Any, Mapping

from PIL import Image, ImageDraw, ImageFont

SIZE = (640, 400)
MARGIN = 16
BACKGROUND = (24, 24, 24)
NODE_FILL = (53, 53, 53)
PACK_NODE_FILL = (40, 64, 90)
TITLE_FILL = (34, 34, 34)
NOTE_FILL = (101, 85, 51)
TEXT = (220, 220, 220)
# Link colours by type, as the frontend's default palette draws them.
LINK_COLORS = {"MODEL": (178, 156, 255), "CLIP": (255, 214, 0), "VAE": (255, 108, 108),
               "CONDITIONING": (255, 160, 49), "LATENT": (255, 157, 245), "IMAGE": (100, 181, 246),
               "MASK": (129, 199, 132), "CONTROL_NET": (0, 214, 122)}
LINK_DEFAULT = (160, 160, 160)
TITLE_HEIGHT = 30
JPEG_QUALITY = 85


def _hex(color: str, fallback: tuple[int, int, int]) -> tuple[int, int, int]:
    color = color.lstrip("#")
    if len(color) == 3:
        color = "".join(ch * 2 for ch in color)
    try:
        return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return fallback


def draw(workflow: Mapping[str, Any], display_names: Mapping[str, str], pack_types: set[str]) -> Image.Image:
    """The graph of a UI workflow, fitted into SIZE; nodes titled as the frontend shows them (their
    title, else the type's display name), the pack's nodes in blue."""
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]
    boxes += [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in workflow.get("groups", []))]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[2] for b in boxes), max(b[3] for b in boxes)
    scale = min((SIZE[0] - 2 * MARGIN) / (right - left), (SIZE[1] - 2 * MARGIN) / (bottom - top))
    dx = (SIZE[0] - (right - left) * scale) / 2 - left * scale
    dy = (SIZE[1] - (bottom - top) * scale) / 2 - top * scale

    def at(x: float, y: float) -> tuple[float, float]:
        return x * scale + dx, y * scale + dy

    image = Image.new("RGB", SIZE, BACKGROUND)
    canvas = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, round(14 * scale * 1.6)))
    for group in workflow.get("groups", []):
        x, y, w, h = group["bounding"]
        color = _hex(group.get("color", "#888"), (136, 136, 136))
        canvas.rectangle([at(x, y), at(x + w, y + h)], fill=tuple(c // 3 for c in color), outline=color)
        canvas.text(at(x + 8, y + 6), group["title"], fill=color, font=font)
    by_id = {node["id"]: node for node in workflow["nodes"]}
    for _, source, out_slot, target, in_slot, kind in workflow["links"]:
        a, b = by_id[source], by_id[target]
        start = at(a["pos"][0] + a["size"][0], a["pos"][1] + 10 + 20 * out_slot)
        end = at(b["pos"][0], b["pos"][1] + 10 + 20 * in_slot)
        middle = (start[0] + end[0]) / 2
        canvas.line([start, (middle, start[1]), (middle, end[1]), end], fill=LINK_COLORS.get(kind, LINK_DEFAULT),
                    width=2, joint="curve")
    for node in workflow["nodes"]:
        x, y = node["pos"]
        w, h = node["size"]
        fill = (NOTE_FILL if node["type"] in ("Note", "MarkdownNote")
                else PACK_NODE_FILL if node["type"] in pack_types else NODE_FILL)
        canvas.rounded_rectangle([at(x, y - TITLE_HEIGHT), at(x + w, y + h)], radius=4, fill=fill, outline=(90, 90, 90))
        canvas.rectangle([at(x, y - TITLE_HEIGHT), at(x + w, y)], fill=tuple(max(0, c - 18) for c in fill))
        title = node.get("title") or display_names.get(node["type"], node["type"])
        width_px = (w - 12) * scale
        while title and canvas.textlength(title, font=font) > width_px:
            title = title[:-2] + "…" if len(title) > 2 else ""
        canvas.text(at(x + 6, y - TITLE_HEIGHT + 6), title, fill=TEXT, font=font)
    return image


def jpeg(workflow: Mapping[str, Any], display_names: Mapping[str, str], pack_types: set[str]) -> bytes:
    """The thumbnail file's bytes."""
    buffer = io.BytesIO()
    draw(workflow, display_names, pack_types).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buffer.getvalue()
