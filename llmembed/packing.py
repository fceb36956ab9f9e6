"""Padding-free forwards: a padded batch's real tokens packed into a few rows, sequences told
apart by ``position_ids`` that restart at 0.

transformers (``masking_utils``) reads restarting ``position_ids`` given without an attention
mask as packed sequences: flash-attention 2 runs them as variable-length sequences (no padding
computed at all), sdpa and eager get a block-diagonal mask (causal or bidirectional inside each
block). On sdpa/eager that mask makes attention quadratic in the packed row's length, not the
texts', so rows are packed up to a token budget: ``pack_tokens`` (a text longer than it gets a
row of its own). Packed rows of one batch are padded to the longest of them with filler tokens
whose positions also restart at 0, so the filler is a block of its own that no text attends
to; its outputs are dropped.

RoPE sees only relative positions, so a packed text's hidden states equal its padded ones (up
to float rounding); the tests check that against the padded forward on every family.

Bidirectional attention (``config.is_causal = False``): transformers 5.19's bidirectional mask
does not read packed ``position_ids``, so packed texts would see each other. There the blocks
are given explicitly, as a 4-D mask (:meth:`Packed.block_mask`), which transformers passes to
sdpa and eager attention unchanged; flash-attention 2 takes no 4-D mask, so that combination
is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pack_rows(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """Consecutive rows grouped so that each group's total length stays within
    ``pack_tokens`` (a row longer than that is a group alone). Keeping the order makes
    unpacking a plain scatter."""
    packs: list[list[int]] = []
    total = 0
    for row, length in enumerate(lengths):
        if packs and total + length <= pack_tokens:
            packs[-1].append(row)
            total += length
        else:
            packs.append([row])
            total = length
    return packs


BLOCK_MASK_ATTENTION = ("sdpa", "eager")  # the implementations transformers hands a 4-D mask to


def require_block_mask_support(attn_implementation: str) -> None:
    """Packed bidirectional blocks are a 4-D mask; refuse attention that never sees one."""
    if attn_implementation not in BLOCK_MASK_ATTENTION:
        raise ValueError(f"packed bidirectional attention needs sdpa or eager attention, not {attn_implementation!r}: "
                         "transformers passes no 4-D mask to it")


def packed_size(attention_mask: torch.Tensor, pack_tokens: int) -> int:
    """The tokens a packed forward of this padded batch runs (filler included)."""
    lengths = attention_mask.sum(dim=1).tolist()
    packs = pack_rows(lengths, pack_tokens)
    return len(packs) * max(sum(lengths[r] for r in rows) for rows in packs)


@dataclass
class Packed:
    """A padded batch's real tokens in packed rows, and where they came from."""

    input_ids: torch.Tensor  # (packs, longest pack)
    position_ids: torch.Tensor  # restarting at 0 for every text and for the filler
    source: torch.Tensor  # flat packed index of each real token, in the padded batch's row-major order
    keep: torch.Tensor  # the padded batch's attention mask, as booleans
    segments: torch.Tensor  # (packs, tokens): which block (text, or a pack's filler) each token is in

    def block_mask(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """The 4-D mask (packs, 1, tokens, tokens) letting each token attend to its own block,
        in both directions: booleans for sdpa, additive ``0 / min`` in ``dtype`` for eager (the
        formats transformers' own masks have)."""
        require_block_mask_support(attn_implementation)
        same = (self.segments[:, :, None] == self.segments[:, None, :])[:, None]
        if attn_implementation == "sdpa":
            return same
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, torch.finfo(dtype).min)

    @property
    def processed_tokens(self) -> int:
        return self.input_ids.numel()

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed hidden states (packs, tokens, dim) back into the padded layout (rows,
        tokens, dim), zeros at the padding, which pooling masks out."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        padded = flat.new_zeros(*self.keep.shape, flat.shape[-1])
        return padded.index_put((self.keep,), flat[self.source])


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, pack_tokens: int, filler_id: int = 0) -> Packed:
    """Pack a padded batch (left or right padding) into rows of at most ``pack_tokens`` tokens."""
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1).tolist()
    packs = pack_rows(lengths, pack_tokens)
    width = max(sum(lengths[r] for r in rows) for rows in packs)
    device = input_ids.device
    packed_ids = torch.full((len(packs), width), filler_id, dtype=input_ids.dtype, device=device)
    positions = torch.empty((len(packs), width), dtype=torch.long, device=device)
    segments = torch.empty((len(packs), width), dtype=torch.long, device=device)
    sources = []
    for p, rows in enumerate(packs):
        used = sum(lengths[r] for r in rows)
        sources.append(torch.arange(p * width, p * width + used, device=device))
        positions[p] = torch.cat([torch.arange(lengths[r], device=device) for r in rows]
                                 + [torch.arange(width - used, device=device)])
        segments[p] = torch.cat([torch.full((lengths[r],), r, device=device) for r in rows]
                                + [torch.full((width - used,), -1, device=device)])
    source = torch.cat(sources)
    packed_ids.view(-1)[source] = input_ids[keep]
    return Packed(packed_ids, positions, source, keep, segments)
