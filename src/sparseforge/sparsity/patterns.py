"""Kernel patterns (PatDNN / PCONV): candidates, library, assignment and projection.

A pattern keeps 4 of the 9 taps of a 3x3 kernel, the centre always among them,
so there are C(8,3) = 56 candidates. Patterns are stored as 9-character strings
of 0/1 in row-major order (``"010111000"``), readable in a TOML file and in a
report; internally as a (k, 9) float tensor.

``channel_block`` b: output channels are taken in blocks of b adjacent filters
that share, per input channel, one pattern and one keep/remove decision. The
scores of a block are summed over its filters before choosing, so each choice
is the best for the block as a whole.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..errors import SparseforgeError

CENTRE = 4


def all_candidates() -> torch.Tensor:
    """The 56 candidate patterns as a (56, 9) 0/1 tensor, in a fixed order."""
    rows = []
    others = [i for i in range(9) if i != CENTRE]
    for combo in itertools.combinations(others, 3):
        r = torch.zeros(9)
        r[list(combo) + [CENTRE]] = 1
        rows.append(r)
    return torch.stack(rows)


def pattern_to_str(p: torch.Tensor) -> str:
    return "".join("1" if v > 0 else "0" for v in p.flatten().tolist())


def pattern_from_str(s: str) -> torch.Tensor:
    s = s.replace("/", "").replace(" ", "")
    if len(s) != 9 or set(s) - {"0", "1"}:
        raise SparseforgeError(f"pattern {s!r} must be 9 characters of 0/1 (row-major 3x3), e.g. '010111000'")
    t = torch.tensor([float(c) for c in s])
    if t.sum() != 4 or t[CENTRE] != 1:
        raise SparseforgeError(f"pattern {s!r} must keep exactly 4 taps including the centre (index 4)")
    return t


def pconv_library(k: int) -> torch.Tensor:
    """Patterns shaped after the 3x3 Laplacian-of-Gaussian (PCONV): taps nearest the centre first.

    Order: the 4 'T' shapes (centre + 3 of the 4 edge neighbours), then the 4 'corner' shapes
    (centre + 2 perpendicular edge neighbours + the corner between them), then the 4 'line + corner'
    shapes. The first k are used. This ordering is ours (derived from the LoG weights: edge taps
    weigh more than corners), not a table copied from the paper.
    """
    n, w, e, s_ = 1, 3, 5, 7
    corners = {(n, w): 0, (n, e): 2, (s_, w): 6, (s_, e): 8}
    pats = [(n, w, e), (n, w, s_), (n, e, s_), (w, e, s_)]
    pats += [(a, b, c) for (a, b), c in corners.items()]
    pats += [(n, s_, 0), (n, s_, 8), (w, e, 2), (w, e, 6)]
    if not 1 <= k <= len(pats):
        raise SparseforgeError(f"the PCONV library has {len(pats)} patterns; num_patterns={k} is out of range")
    out = torch.zeros(k, 9)
    for i, taps in enumerate(pats[:k]):
        out[i, list(taps) + [CENTRE]] = 1
    return out


def block_sum(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum over blocks of ``block`` adjacent entries of dim 0 (last block may be shorter)."""
    if block == 1:
        return x
    o = x.shape[0]
    nb = math.ceil(o / block)
    pad = nb * block - o
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))])
    return x.reshape(nb, block, *x.shape[1:]).sum(1)


def block_expand(x: torch.Tensor, block: int, o: int) -> torch.Tensor:
    """Inverse of :func:`block_sum`'s grouping: repeat each block's value for its filters."""
    if block == 1:
        return x
    return x.repeat_interleave(block, dim=0)[:o]


def kernel_energy(weight: torch.Tensor) -> torch.Tensor:
    """Squared weights as (O, I, kh*kw)."""
    w = weight.detach().float()
    return (w * w).reshape(w.shape[0], w.shape[1], -1)


def best_patterns(weight: torch.Tensor, library: torch.Tensor, block: int = 1,
                  within: torch.Tensor | None = None) -> torch.Tensor:
    """Index into ``library`` of the pattern keeping the most L2 energy, per (block of) kernel: (O, I) long.

    ``within`` (a 0/1 mask of weight's shape, e.g. an existing mask) restricts each kernel to patterns that
    fit inside it, so re-pruning keeps a kernel's pattern instead of swapping it on a tie (masks only shrink).
    """
    e = block_sum(kernel_energy(weight), block)            # (B, I, 9)
    kept = torch.einsum("bik,pk->bip", e, library)          # (B, I, P)
    if within is not None:
        w9 = within.detach().float().reshape(within.shape[0], within.shape[1], 9)
        # taps outside the allowed region, summed over the block's filters
        outside = block_sum((1 - w9).clamp_min(0), block)   # (B, I, 9)
        bad = torch.einsum("bik,pk->bip", outside, library) > 0
        fits_any = (~bad).any(-1, keepdim=True)
        kept = torch.where(bad & fits_any, torch.full_like(kept, -1.0), kept)
    idx = kept.argmax(-1)
    return block_expand(idx, block, weight.shape[0])


def count_best_candidates(weights: list[torch.Tensor], block: int = 1,
                          kernel_masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """How often each of the 56 candidates is the best fit, over all (kept) kernels of the given layers."""
    cands = all_candidates()
    counts = torch.zeros(len(cands), dtype=torch.long)
    for i, w in enumerate(weights):
        idx = best_patterns(w, cands, block)
        if block > 1:  # count each block once
            idx = idx[::block]
        sel = idx.flatten()
        if kernel_masks is not None:
            km = kernel_masks[i]
            km = km[::block] if block > 1 else km
            sel = idx.flatten()[km.flatten() > 0]
        counts += torch.bincount(sel, minlength=len(cands))
    return counts


def extract_library(weights: list[torch.Tensor], k: int, block: int = 1,
                    kernel_masks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidates by best-fit count; returns (library (k, 9), counts (k,)). Ties go to the lower index."""
    counts = count_best_candidates(weights, block, kernel_masks)
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))[:k]
    return all_candidates()[order], counts[order]


def pattern_mask(weight: torch.Tensor, library: torch.Tensor, block: int = 1,
                 within: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask of weight's shape keeping, in every kernel, its best library pattern."""
    idx = best_patterns(weight, library, block, within)
    return library[idx].reshape(weight.shape).to(weight.dtype)


def keep_count(n: int, keep_fraction: float) -> int:
    """Kernels to keep: nearest integer to n * fraction, at least 1 when anything is kept."""
    if keep_fraction >= 1.0:
        return n
    return max(1, min(n, int(math.floor(n * keep_fraction + 0.5)))) if n else 0


def connectivity_mask(weight: torch.Tensor, keep_fraction: float, block: int = 1,
                      pre_mask: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask keeping the :func:`keep_count` (block) kernels with the largest L2 norm."""
    o, i = weight.shape[:2]
    return connectivity_mask_k(weight, keep_count(math.ceil(o / block) * i, keep_fraction), block, pre_mask)


def connectivity_mask_k(weight: torch.Tensor, k: int, block: int = 1,
                        pre_mask: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask (weight's shape) keeping exactly ``k`` (block) kernels with the largest L2 norm.

    ``pre_mask`` (e.g. the pattern mask) is applied before scoring, so kernels compete on what they keep.
    Ties are broken by index, so the result is deterministic.
    """
    w = weight.detach().float()
    if pre_mask is not None:
        w = w * pre_mask
    e = block_sum(kernel_energy(w).sum(-1), block)          # (B, I)
    keep = torch.zeros(e.numel(), dtype=weight.dtype)
    if k > 0:
        order = torch.argsort(e.flatten(), descending=True, stable=True)[:k]
        keep[order] = 1
    km = block_expand(keep.reshape(e.shape), block, weight.shape[0])   # (O, I)
    return km[:, :, None, None].expand_as(weight).contiguous()


def num_block_kernels(weight: torch.Tensor, block: int) -> int:
    return math.ceil(weight.shape[0] / block) * weight.shape[1]


def kernel_mask_of(mask: torch.Tensor) -> torch.Tensor:
    """(O, I) 0/1: which kernels of a conv mask keep anything."""
    return (mask.reshape(mask.shape[0], mask.shape[1], -1).sum(-1) > 0).to(mask.dtype)


def parse_ratio(value: float | str) -> float:
    """Kernel keep fraction from '3.6x' / 3.6 (a reduction factor, >= 1) or a fraction in (0, 1]."""
    if isinstance(value, str):
        s = value.strip().lower()
        try:
            f = float(s[:-1]) if s.endswith("x") else float(s)
        except ValueError:
            raise SparseforgeError(f"connectivity {value!r}: use a reduction like '3.6x' or a keep fraction like 0.28") from None
        if s.endswith("x") and f < 1:
            raise SparseforgeError(f"connectivity {value!r}: a reduction factor must be >= 1x")
    else:
        f = float(value)
    if not f > 0 or not math.isfinite(f):
        raise SparseforgeError(f"connectivity {value!r} must be positive")
    return 1.0 / f if f >= 1 else f
