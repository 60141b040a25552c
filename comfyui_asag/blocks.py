"""Which attention layers the ASAG nodes perturb: parsing of the block inputs.

Pure Python (no torch, no ComfyUI import), so every error message is checked without a model.

UNet blocks use ComfyUI's own keys for attention replace patches: ``(part, block_id)`` for every
transformer of a block, or ``(part, block_id, transformer_index)`` for one, where ``part`` is
``"input"``, ``"middle"`` or ``"output"`` and ``block_id`` the index in ``input_blocks`` /
``output_blocks`` (the middle block is always ``("middle", 0)``).

``unet_block_list`` follows the syntax of the sd-perturbed-attention node pack: comma-separated
entries ``<part><ordinal>[.<transformer>]`` where ``d`` = input (down), ``m`` = middle, ``u`` =
output (up); the ordinal counts only the blocks that hold self-attention (SDXL: ``d0``-``d3``,
``m0``, ``u0``-``u5``; SD 1.5: ``d0``-``d5``, ``m0``, ``u0``-``u8``); either number may be a range
(``d0-3`` or ``d0-d3``, ``d2.2-9``). Example: ``m0,u0.4,d2.2-9``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

UNET_PARTS = ("input", "middle", "output")
_PREFIX = {"d": "input", "m": "middle", "u": "output"}
_LETTER = {part: letter for letter, part in _PREFIX.items()}
_ENTRY = re.compile(r"^([dmu])(\d+)(?:-\1?(\d+))?(?:\.(\d+)(?:-(\d+))?)?$")
# Module names of ComfyUI's UNet self-attention transformers, e.g. "input_blocks.4.1.transformer_blocks.0".
# (input_blocks/output_blocks are lists of sequentials; middle_block is one sequential.)
_UNET_TRANSFORMER = re.compile(r"^(?:(input_blocks|output_blocks)\.(\d+)|(middle_block))\.\d+\.transformer_blocks\.(\d+)$")

UNetBlock = tuple  # ("input", 4) or ("input", 4, 1): a key of ComfyUI's attn1 replace patches


class UNetLayout:
    """The self-attention transformers of a UNet: for each part, ``[(block_id, n_transformers)]``
    in model order (the ordinals of ``unet_block_list`` index these lists)."""

    def __init__(self, module_names: Iterable[str]):
        counts: dict[tuple[str, int], int] = {}
        for name in module_names:
            m = _UNET_TRANSFORMER.match(name)
            if m is None:
                continue
            part = {"input_blocks": "input", "output_blocks": "output", None: "middle"}[m.group(1)]
            block_id = 0 if part == "middle" else int(m.group(2))  # ComfyUI keys the middle block as 0
            key = (part, block_id)
            counts[key] = max(counts.get(key, 0), int(m.group(4)) + 1)
        self.parts: dict[str, list[tuple[int, int]]] = {
            part: sorted((bid, n) for (p, bid), n in counts.items() if p == part) for part in UNET_PARTS
        }
        if not any(self.parts.values()):
            raise ValueError(
                "the model has no UNet self-attention transformer blocks (input_blocks/middle_block/output_blocks "
                "... transformer_blocks); the ASAG UNet node needs an SD 1.5/SD 2/SDXL-style UNet, use the ASAG DiT "
                "node for DiT models"
            )

    def describe(self) -> str:
        """What can be chosen, in both syntaxes (for error messages)."""
        out = []
        for part in UNET_PARTS:
            blocks = self.parts[part]
            if blocks:
                ids = ", ".join(f"{bid} ({n} transformer{'s' if n > 1 else ''})" for bid, n in blocks)
                out.append(f"{part}: block ids {ids} = {_ordinals(part, len(blocks))}")
        return "; ".join(out)

    def transformers(self, part: str, block_id: int) -> int | None:
        for bid, n in self.parts[part]:
            if bid == block_id:
                return n
        return None


def _ordinals(part: str, count: int) -> str:
    letter = _LETTER[part]
    return "none" if count == 0 else f"{letter}0" if count == 1 else f"{letter}0-{letter}{count - 1}"


def unet_single_block(unet_block, unet_block_id, layout: UNetLayout) -> list[UNetBlock]:
    """The block of the ``unet_block`` + ``unet_block_id`` inputs (ComfyUI's own block ids, as in
    its PAG node), checked against the model."""
    if unet_block not in UNET_PARTS:
        raise ValueError(f"unet_block must be one of {UNET_PARTS}, got {unet_block!r}")
    if isinstance(unet_block_id, bool) or not isinstance(unet_block_id, int):
        raise TypeError(f"unet_block_id must be an int, got {type(unet_block_id).__name__} {unet_block_id!r}")
    if layout.transformers(unet_block, unet_block_id) is None:
        raise ValueError(
            f"unet_block_id {unet_block_id} is not a {unet_block} block with self-attention in this model; "
            f"choose one of: {layout.describe()}"
        )
    return [(unet_block, unet_block_id)]


def _range(first: str, last: str | None, what: str, entry: str, name: str) -> range:
    lo = int(first)
    hi = lo if last is None else int(last)
    if hi < lo:
        raise ValueError(f"{name}: entry {entry!r} has a decreasing {what} range {lo}-{hi}")
    return range(lo, hi + 1)


def _unet_entries(text, name: str) -> list[tuple[str, tuple]]:
    """The syntax of ``unet_block_list`` alone (no model needed): ``[(entry, regex groups)]``, ``[]``
    for a blank string; raises for a non-string, a malformed entry or a decreasing range."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string such as 'm0,u0.4,d2.2-9', got {type(text).__name__}")
    entries = [e.strip() for e in text.split(",")]
    if not any(entries):
        return []
    out = []
    for entry in entries:
        m = _ENTRY.match(entry)
        if m is None:
            raise ValueError(
                f"{name}: cannot parse entry {entry!r}; expected <d|m|u><block>[.<transformer>] with optional ranges, "
                "e.g. 'm0', 'u0.4', 'd2.2-9', 'd0-3' (d = input/down, m = middle, u = output/up)"
            )
        letter, b_lo, b_hi, t_lo, t_hi = m.groups()
        _range(b_lo, b_hi, "block", entry, name)
        if t_lo is not None:
            _range(t_lo, t_hi, "transformer", entry, name)
        out.append((entry, m.groups()))
    return out


def check_unet_block_list_syntax(text, name: str = "unet_block_list") -> None:
    """Raise what :func:`parse_unet_block_list` would raise for ``text`` on any model (prompt
    validation runs before there is a model); a blank string is allowed (the node then uses
    ``unet_block``/``unet_block_id``)."""
    _unet_entries(text, name)


def parse_unet_block_list(text: str, layout: UNetLayout, name: str = "unet_block_list") -> list[UNetBlock]:
    """``"m0,u0.4,d2.2-9"`` -> ``[("middle", 0), ("output", 0, 4), ("input", 7, 2), ..., ("input", 7, 9)]``
    (for SDXL), checked against ``layout``; duplicates removed, order kept."""
    entries = _unet_entries(text, name)
    if not entries:
        raise ValueError(f"{name} is empty; give entries such as 'm0,u0.4,d2.2-9' ({layout.describe()})")
    out: list[UNetBlock] = []
    for entry, (letter, b_lo, b_hi, t_lo, t_hi) in entries:
        part = _PREFIX[letter]
        blocks = layout.parts[part]
        for ordinal in _range(b_lo, b_hi, "block", entry, name):
            if ordinal >= len(blocks):
                raise ValueError(
                    f"{name}: entry {entry!r} asks for {letter}{ordinal}, but this model's {part} blocks with "
                    f"self-attention are {_ordinals(part, len(blocks))} ({layout.describe()})"
                )
            block_id, n_transformers = blocks[ordinal]
            if t_lo is None:
                keys = [(part, block_id)]
            else:
                t_range = _range(t_lo, t_hi, "transformer", entry, name)
                if t_range[-1] >= n_transformers:
                    raise ValueError(
                        f"{name}: entry {entry!r} asks for transformer {t_range[-1]} of {letter}{ordinal}, which has "
                        f"transformers 0-{n_transformers - 1}"
                    )
                keys = [(part, block_id, t) for t in t_range]
            out.extend(k for k in keys if k not in out)
    return out


def _layer_entries(text, name: str) -> list[tuple[str, range]]:
    """The syntax of a DiT layer list alone (no model needed): ``[(entry, indices)]``."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string of block indices such as '7, 8, 9' or '7-9', got {type(text).__name__}")
    out = []
    for entry in (e.strip() for e in text.replace(";", ",").split(",")):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", entry)
        if m is None:
            raise ValueError(f"{name}: cannot parse {entry!r}; expected block indices such as '7, 8, 9' or ranges such as '7-9'")
        out.append((entry, _range(m.group(1), m.group(2), "block", entry, name)))
    return out


def check_layer_list_syntax(text, name: str) -> bool:
    """Raise what :func:`parse_layer_list` would raise for ``text`` on any model; True if it names a block."""
    return bool(_layer_entries(text, name))


def parse_layer_list(text, count: int, name: str) -> list[int]:
    """DiT block indices: ``"7, 8, 9"`` or ``"7-9"`` (ComfyUI's SkipLayerGuidanceDiT convention, with
    ranges), each in ``[0, count)``; ``""`` -> ``[]``. Duplicates removed, order kept."""
    out: list[int] = []
    for entry, indices in _layer_entries(text, name):
        for i in indices:
            if i >= count:
                have = f"0-{count - 1}" if count else "none in this model"
                raise ValueError(f"{name}: block {i} does not exist; this model's blocks for {name} are {have}")
            if i not in out:
                out.append(i)
    return out
