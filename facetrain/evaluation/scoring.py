"""Pair scores from embeddings (torch): every unordered pair of a labelled set, or listed pairs, and the
all-pairs ROC built from them with `metrics` (numpy only).

* **All pairs** (:func:`all_pairs_roc`): every unordered pair ``i < j`` of a labelled embedding set is scored
  by blocked matrix products (:func:`all_pair_scores`). The ROC is either *exact* (every score kept, so memory
  grows with the number of pairs, i.e. quadratically with the number of images) or *histogram* (scores
  streamed into a fixed :class:`metrics.ScoreHistogram`, so memory is constant and thresholds are quantised
  to the bin width). Either mode can also keep the worst pairs (:class:`WorstPairs`: the lowest genuine and
  highest impostor scores, a top-k per block, so memory stays O(k)).
* **Listed pairs** (:func:`pair_scores`): the cosine of each row pair, e.g. an LFW pairs file (`pairfile`) or
  verify's two images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from facetrain.evaluation.bootstrap import UnitPairAccumulator
from facetrain.evaluation.metrics import (
    DEFAULT_BINS,
    MetricsError,
    RocCurve,
    ScoreHistogram,
    count_pairs,
    require_both_classes,
    roc_exact,
)


def _score_dtype(device: torch.device) -> torch.dtype:
    # Scores are computed in float64 where the device supports it. This is not about float32 rounding
    # (~1e-7, far below the 3e-5 histogram bin) but about what float32 matmuls silently become: TF32 on
    # CUDA when a global flag is on (Accelerate turns it on with dynamo; ~1e-3 error) and fp16/bf16 under
    # autocast. float64 is exempt from both, needs no global-flag juggling, and the products are a small
    # part of the cost next to binning or sorting the N^2/2 scores. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _matmul_outside_autocast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 is exempt from autocast, but the float32 fallback (MPS) is not: compute it as asked.
    if torch.amp.is_autocast_available(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            return a @ b
    return a @ b


def _checked_inputs(
    emb: torch.Tensor, labels: torch.Tensor | np.ndarray | Sequence[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised embeddings in the score dtype, labels on the same device), or a one-line MetricsError."""
    if emb.ndim != 2:
        raise MetricsError(f"embeddings must be 2-D (N, D), got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    lab = labels.detach() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    lab = lab.to(emb.device)
    if lab.shape != (n,):
        raise MetricsError(f"labels must have shape ({n},) to match the embeddings, got {tuple(lab.shape)}")
    if block_size < 1:
        raise MetricsError(f"block_size must be >= 1, got {block_size}")
    emb = emb.detach()
    if not bool(torch.isfinite(emb).all()):
        raise MetricsError("embeddings contain NaN or inf: cannot score pairs")
    return F.normalize(emb.to(_score_dtype(emb.device)), dim=1), lab


class WorstPairs:
    """The ``k`` genuine pairs with the lowest scores and the ``k`` impostor pairs with the highest (the pairs a
    threshold gets wrong first), kept while blocks of scores stream past: a top-k of each block merged into
    the running top-k, so memory is O(k) whatever the number of pairs.

    ``genuine`` / ``impostor``: arrays ``(score, i, j)`` with ``i < j`` row indices into the embeddings,
    worst first (ties by ``i``, then ``j``).
    """

    def __init__(self, k: int):
        if k < 1:
            raise MetricsError(f"worst pairs: k must be >= 1, got {k}")
        self.k = k
        empty = np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.genuine, self.impostor = empty, empty

    def add_block(self, scores: torch.Tensor, genuine: torch.Tensor | None, valid: torch.Tensor | None,
                  rows: torch.Tensor, cols: torch.Tensor, scale: float = 1.0) -> None:
        """One block ``scores[r, c]`` (times ``1 / scale``) of the pairs ``(rows[r], cols[c])``; ``genuine``:
        its same-identity mask (None: every pair an impostor); ``valid``: the pairs to count (None: all)."""
        impostor = None if genuine is None else ~genuine
        if valid is not None:
            impostor = valid if impostor is None else impostor & valid
        if genuine is not None:
            genuine = genuine if valid is None else genuine & valid
            self.genuine = self._merge(self.genuine, self._top(scores, genuine, rows, cols, scale, False), False)
        self.impostor = self._merge(self.impostor, self._top(scores, impostor, rows, cols, scale, True), True)

    def add_pairs(self, scores: np.ndarray, genuine: np.ndarray, first: np.ndarray, second: np.ndarray) -> None:
        """Listed pairs (a pairs file): pair ``k`` is rows ``(first[k], second[k])``, in the list's order."""
        scores, genuine = np.asarray(scores, dtype=np.float64), np.asarray(genuine, dtype=bool)
        first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
        self.genuine = self._merge(self.genuine, (scores[genuine], first[genuine], second[genuine]), False)
        self.impostor = self._merge(self.impostor, (scores[~genuine], first[~genuine], second[~genuine]), True)

    def _top(self, scores, keep, rows, cols, scale, largest):
        """The block's k best pairs among `keep`. Only the k rows with the best row extremes can hold them (a row
        whose extreme is beaten by k other rows' has k better pairs elsewhere), so the full-block pass is one
        row reduction (~10x cheaper than a top-k over the block, measured on 2048 x 2048)."""
        fill = -torch.inf if largest else torch.inf
        scores = scores if keep is None else scores.masked_fill(~keep, fill)
        row_best = scores.amax(dim=1) if largest else scores.amin(dim=1)
        cand = torch.topk(row_best, min(self.k, len(row_best)), largest=largest).indices
        flat = scores[cand].reshape(-1)
        value, index = torch.topk(flat, min(self.k, flat.numel()), largest=largest, sorted=False)
        found = torch.isfinite(value)
        value, index = value[found], index[found]
        i, j = rows[cand[index // scores.shape[1]]], cols[index % scores.shape[1]]
        return ((value.double() / scale).cpu().numpy(), torch.minimum(i, j).cpu().numpy(),
                torch.maximum(i, j).cpu().numpy())

    def _merge(self, kept, new, largest):
        score, i, j = (np.concatenate(parts) for parts in zip(kept, new, strict=True))
        order = np.lexsort((j, i, -score if largest else score))[: self.k]
        return score[order], i[order], j[order]


def all_pair_scores(
    emb: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    block_size: int = 4096,
    worst: WorstPairs | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(scores, genuine)`` blocks covering every unordered pair ``i < j`` of ``emb`` exactly once.

    Args:
        emb: (N, D) embeddings on any device. They are L2-normalised here (O(N*D), negligible next to the
            O(N^2*D) products), so the dot products are cosines in [-1, 1] even if the caller forgot to.
        labels: (N,) integer identity labels.
        block_size: rows/columns per block. One block holds ``block_size**2`` scores (4096 -> 16.8M scores,
            128 MiB in float64 on the device, 64 MiB as float32 on the host).
        worst: collects the worst genuine and impostor pairs of every block as it is yielded.

    Yields:
        ``scores`` (float32, 1-D) and ``genuine`` (bool, same length) for the pairs of one block
        ``emb[a:b] @ emb[c:d].T`` with ``c >= a``; diagonal blocks contribute only their strict upper
        triangle, so no self pairs and no pair twice.
    """
    x, lab = _checked_inputs(emb, labels, block_size)
    n = x.shape[0]
    positions = torch.arange(n, device=x.device)
    for a in range(0, n, block_size):
        b = min(a + block_size, n)
        for c in range(a, n, block_size):
            d = min(c + block_size, n)
            scores = _matmul_outside_autocast(x[a:b], x[c:d].T).to(torch.float32)  # float32 as yielded
            genuine = lab[a:b, None] == lab[None, c:d]
            if worst is not None:
                upper = _upper_triangle(b - a, x.device) if c == a else None
                worst.add_block(scores, genuine, upper, positions[a:b], positions[c:d])
            if c == a:
                # Diagonal block: keep the strict upper triangle. Its lower half mirrors pairs already in
                # the upper half, and the diagonal holds self pairs (score 1, always "genuine").
                upper = _upper_triangle(b - a, x.device)
                scores, genuine = scores[upper], genuine[upper]
            yield (
                scores.reshape(-1).cpu().numpy(),
                genuine.reshape(-1).cpu().numpy(),
            )


def _upper_triangle(size: int, device: torch.device) -> torch.Tensor:
    """The pairs ``i < j`` of a diagonal block: no self pairs, no pair twice."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_(diagonal=1)


def pair_scores(emb_a: torch.Tensor, emb_b: torch.Tensor) -> np.ndarray:
    """Cosine score of each row pair ``(emb_a[k], emb_b[k])`` (LFW-style pair lists): float64, shape (K,)."""
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
        raise MetricsError(
            f"pair embeddings must be two (K, D) tensors of equal shape, got {tuple(emb_a.shape)} "
            f"and {tuple(emb_b.shape)}"
        )
    dtype = _score_dtype(emb_a.device)
    a = F.normalize(emb_a.detach().to(dtype), dim=1)
    b = F.normalize(emb_b.detach().to(emb_a.device, dtype), dim=1)
    return (a * b).sum(dim=1).cpu().numpy().astype(np.float64)



# ------------------------------------------------------------------------------------------ all pairs ROC


def all_pairs_roc(
    emb: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    mode: Literal["auto", "exact", "histogram"] = "auto",
    max_exact_pairs: int = 20_000_000,
    block_size: int = 4096,
    bins: int = DEFAULT_BINS,
    worst: WorstPairs | None = None,
) -> RocCurve:
    """ROC over all unordered pairs of a labelled embedding set.

    ``mode="exact"`` keeps every score (5 bytes per pair for the scores and flags; sklearn's roc_curve then sorts
    and accumulates in int64/float64: ~70 bytes per pair at peak, measured: 0.7 GiB for 10^7 pairs);
    ``"histogram"`` streams blocks into a
    :class:`ScoreHistogram` (memory independent of N; thresholds quantised to ``2 / bins``); ``"auto"``
    picks exact when the total number of pairs is at most ``max_exact_pairs``. ``worst``: also collect the
    worst pairs there (either mode; measured cost in docs/evaluation.md).
    """
    if mode not in ("auto", "exact", "histogram"):
        raise MetricsError(f"mode must be 'auto', 'exact' or 'histogram', got {mode!r}")
    n_genuine, n_impostor = count_pairs(labels)
    require_both_classes(n_genuine, n_impostor)
    if mode == "auto":
        mode = "exact" if n_genuine + n_impostor <= max_exact_pairs else "histogram"

    if mode == "exact":
        score_blocks, genuine_blocks = [], []
        for scores, genuine in all_pair_scores(emb, labels, block_size, worst):
            score_blocks.append(scores)
            genuine_blocks.append(genuine)
        return roc_exact(np.concatenate(score_blocks), np.concatenate(genuine_blocks))

    hist = ScoreHistogram(bins)
    if bins >= 2 and bins & (bins - 1) == 0:
        _stream_all_pairs_into(hist, emb, labels, block_size, worst)
    else:  # the fast kernel's exact binning needs a power-of-two bin count
        for scores, genuine in all_pair_scores(emb, labels, block_size, worst):
            hist.add(scores, genuine)
    return hist.roc()


#: Rows/columns per block in the streaming histogram kernel: a 2048 x 2048 block (32 MiB of float64 scores)
#: keeps its element-wise passes in cache; measured fastest of 512..4096 on a 2-core AVX-512 CPU.
_STREAM_BLOCK = 2048


def _bincount(idx: torch.Tensor, minlength: int) -> np.ndarray:
    # numpy's bincount is ~8x faster than torch's on CPU; on an accelerator, count on the device.
    if idx.device.type == "cpu":
        return np.bincount(idx.numpy().reshape(-1), minlength=minlength)
    return torch.bincount(idx.reshape(-1), minlength=minlength).cpu().numpy()


def _stream_all_pairs_into(
    hist: ScoreHistogram,
    emb: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    block_size: int,
    worst: WorstPairs | None = None,
) -> None:
    """Add every unordered pair's score to ``hist`` (power-of-two ``bins``): the same counts as ``hist.add``
    over :func:`all_pair_scores`, several times faster (10^5 512-d embeddings = 5e9 pairs: ~170 CPU seconds,
    1.7 GB peak; see bench/eval_throughput.py).

    * The bin is computed on the block in torch: the float32 score times ``bins / 2`` (a power of two) is
      exact, so ``floor`` of it is the bin offset from 0, bit for bit what ``add`` computes in float64
      (except scores in (-6e-17, 0), which ``add``'s rounding of ``s + 1`` puts in the bin starting at 0).
      Only the float64 sums may differ in the last bit from :func:`all_pair_scores`' larger blocks.
    * Rows are sorted by label, so genuine pairs only occur in blocks whose label ranges touch; every other
      block is all impostors and is counted without building a genuine mask.
    * Blocks of at most ``_STREAM_BLOCK`` rows keep the element-wise passes in cache.
    """
    x, lab = _checked_inputs(emb, labels, block_size)
    order = torch.argsort(lab, stable=True)
    x, lab = x[order], lab[order]
    lab_host = lab.cpu().numpy()
    bins, half = hist.bins, hist.bins // 2
    block = min(block_size, _STREAM_BLOCK)
    n = x.shape[0]
    for a in range(0, n, block):
        b = min(a + block, n)
        for c in range(a, n, block):
            d = min(c + block, n)
            # Scaling the row block by bins/2 (a power of two) scales every product and sum exactly, so this
            # is float32(score) * bins/2 without a pass over the block; its floor + bins/2 is the bin index,
            # out-of-range cosines clamped into the end bins.
            scaled = _matmul_outside_autocast(x[a:b] * half, x[c:d].T).to(torch.float32)
            impostors_only = c > a and lab_host[b - 1] != lab_host[c]
            same = None if impostors_only else lab[a:b, None] == lab[None, c:d]
            upper = _upper_triangle(b - a, x.device) if c == a else None
            if worst is not None:  # before the in-place binning below; rows map back to the caller's order
                worst.add_block(scaled, same, upper, order[a:b], order[c:d], scale=half)
            idx = scaled.floor_().clamp_(-half, half - 1).add_(half).to(torch.int32)
            if impostors_only:
                hist.impostor_counts += _bincount(idx, bins)
                continue
            # One count over 2*bins slots (impostor bins, then genuine bins), as in ScoreHistogram.add.
            slot = idx + bins * same
            if upper is not None:  # diagonal block: strict upper triangle only (no self pairs, no pair twice)
                slot = slot[upper]
            counts = _bincount(slot, 2 * bins)
            hist.impostor_counts += counts[:bins]
            hist.genuine_counts += counts[bins:]


# --------------------------------------------------------------------------------------- bootstrap counts


def all_pairs_unit_counts(
    emb: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    units: np.ndarray,
    accumulator: UnitPairAccumulator,
    block_size: int = _STREAM_BLOCK,
) -> None:
    """Count every unordered pair into ``accumulator`` (bootstrap.UnitPairAccumulator): its grid bin, the
    resampling unit of each image (``units``, from bootstrap.identity_units) and its genuine flag.

    One more pass of blocked products over the pairs, binned on the device at the accumulator's thresholds.
    The scores are compared as float32, the precision the ROC was built from, so a pair lands on the same side
    of every grid threshold as in the ROC. Rows are sorted by unit, so each block touches few units.
    """
    x, lab = _checked_inputs(emb, labels, block_size)
    unit = torch.as_tensor(np.asarray(units, dtype=np.int64), device=x.device)
    order = torch.argsort(unit, stable=True)
    x, lab, unit = x[order], lab[order], unit[order].to(torch.int32)
    unit_host = unit.cpu().numpy()
    edges = torch.as_tensor(accumulator.thresholds[:-1][::-1].copy(), dtype=torch.float32, device=x.device)
    n_bins, n, block = accumulator.n_bins, x.shape[0], min(block_size, _STREAM_BLOCK)
    for a in range(0, n, block):
        b = min(a + block, n)
        for c in range(a, n, block):
            d = min(c + block, n)
            lo_a, lo_b = int(unit_host[a]), int(unit_host[c])
            na, nb = int(unit_host[b - 1]) - lo_a + 1, int(unit_host[d - 1]) - lo_b + 1
            scores = _matmul_outside_autocast(x[a:b], x[c:d].T).to(torch.float32)
            # slot = ((genuine * na + row unit) * nb + column unit) * n_bins + bin, in int32 in place (the local
            # slot count 2 * na * nb * n_bins is far below 2**31)
            slot = ((unit[a:b, None] - lo_a) * nb + (unit[None, c:d] - lo_b)).mul_(n_bins)
            slot += torch.bucketize(scores, edges, out_int32=True, right=True)  # thresholds <= score
            slot += (lab[a:b, None] == lab[None, c:d]).to(torch.int32) * (na * nb * n_bins)
            if c == a:  # diagonal block: strict upper triangle only (no self pairs, no pair twice)
                slot = slot[torch.ones(b - a, b - a, dtype=torch.bool, device=x.device).triu_(diagonal=1)]
            local = _bincount(slot, 2 * na * nb * n_bins).reshape(2, na, nb, n_bins)
            accumulator.add_local(local, lo_a, lo_b)
