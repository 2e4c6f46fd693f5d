"""The subspace method: what every positive text's *token trajectory* shares.

Pooling reduces a text to one point (its last token), so a nuisance that happens to sit at the
last token survives a mean. Here each text is its whole token-by-hidden matrix X_i, reduced to the
subspace its tokens span: the orthonormal right singular vectors V_i of X_i at full (numerical)
rank, so P_i = V_i^T V_i is the projector onto that rowspace. Per concept

    D = M_pos - M_neg,  M_pos = mean of P_i over positives,  M_neg = mean over negatives,

and the direction is the top ``eigen_k`` eigenvectors of D, each weighted by its eigenvalue
(negative weights clamped to 0, so directions the negatives share more than the positives never
contribute) and signed toward the positives' pooled mean. A flat top spectrum (a concept spread
over several shared directions) is kept as such; with a clear gap this is the top eigenvector.
The top 20 eigenvalues are returned so the quality report can tell the two cases apart.

Memory (why it stays bounded at 200 concepts x 4 layers x hidden 5120): nothing of size
concepts x hidden x hidden ever exists. Per layer there is one hidden x hidden sum S_all of every
text's projector (on the device), and per text its basis V_i, rank <= min(tokens, hidden), kept
on the host: the same size as the text's token activations. A concept's M_neg is
(S_all - sum of P_i over texts that are not its negatives) / n_neg, so D is applied as a
matrix-vector product built from S_all and the few bases of its positives (and of any held-out
texts), one concept at a time, and its top eigenpairs come from an iterative Rayleigh-Ritz
solver that needs only those products, started from the positives' own token subspaces.
Peak memory: layers x hidden^2 (device) + corpus tokens x hidden x layers (host) + one concept's
bases and solver basis (device). Keeping a dense M per concept instead would take
200 x 4 x 5120^2 x 4 bytes = 84 GB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from amygdala import AmygdalaError

#: How many top eigenvalues of D are kept per concept and layer for the quality report.
EIGENVALUES_KEPT = 20


class TokenSubspaces:
    """Per-text token rowspace bases and their per-layer sum: the subspace method's input.

    Pass :meth:`add` as ``collect(on_tokens=...)``; it sees each text's content tokens once per
    layer. The basis and the running sum are computed on ``device`` (the model's); bases are
    kept on the host.
    """

    def __init__(self, layers: Sequence[int], hidden: int, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.hidden = hidden
        self.total = {l: torch.zeros(hidden, hidden, device=self.device) for l in layers}
        self.bases: dict[int, dict[int, torch.Tensor]] = {l: {} for l in layers}

    def add(self, row: int, layer: int, matrix: torch.Tensor, start: int) -> None:
        """Record one text's tokens at one layer (``collect``'s ``on_tokens`` signature).

        Position 0 (the attention sink, whose residual is an outlier shared by every text) is
        dropped when the text starts there and has other tokens.
        """
        if layer not in self.total:
            raise ValueError(f"layer {layer} was not declared to TokenSubspaces (has {list(self.total)})")
        if row in self.bases[layer]:
            raise ValueError(f"text row {row} added twice at layer {layer}")
        x = matrix[1:] if start == 0 and len(matrix) > 1 else matrix
        basis = rowspace(x.to(self.device, torch.float32))
        self.total[layer] += basis.T @ basis
        self.bases[layer][row] = basis.cpu()

    def stack(self, layer: int, rows: Sequence[int]) -> torch.Tensor:
        """The bases of ``rows`` stacked [sum of ranks, hidden] on the device."""
        missing = [r for r in rows if r not in self.bases[layer]]
        if missing:
            raise ValueError(f"texts {missing[:5]} have no token basis at layer {layer}; collect them with on_tokens")
        if not rows:
            return torch.zeros(0, self.hidden, device=self.device)
        return torch.cat([self.bases[layer][r] for r in rows]).to(self.device)


def rowspace(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [rank, hidden] of the rows of ``x`` at full numerical rank.

    Rank is counted like ``torch.linalg.matrix_rank`` on float32 data: singular values above
    max(shape) * eps * the largest one. The basis comes from the eigendecomposition of the
    smaller Gram matrix in float64 (exact enough for that threshold), which is far cheaper than
    an SVD of the tall token matrix, on a GPU above all; this runs once per text and layer.
    """
    n, hidden = x.shape
    x64 = x.double()
    if n <= hidden:
        lam, u = torch.linalg.eigh(x64 @ x64.T)
    else:
        lam, v = torch.linalg.eigh(x64.T @ x64)
    keep = lam > (max(n, hidden) * torch.finfo(torch.float32).eps) ** 2 * lam[-1].clamp_min(0)
    if n <= hidden:
        basis = (u[:, keep] / lam[keep].sqrt()).T @ x64
    else:
        basis = v[:, keep].T
    return basis.flip(0).to(x.dtype)


def top_eigenpairs(
    apply: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    m: int,
    *,
    device: torch.device,
    start: torch.Tensor | None = None,
    tol: float = 1e-4,
    oversample: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` largest (algebraic) eigenpairs of a symmetric n x n operator: ([m], [n, m]).

    Rayleigh-Ritz on a growing orthonormal basis: it starts from the columns of ``start``
    (topped up with random ones to at least ``m + oversample``) and each step adds the
    residuals of the top ``m + oversample`` Ritz pairs (a block Krylov step aimed at the wanted
    pairs), until every wanted pair has residual norm <= ``tol`` times the largest Ritz value's
    magnitude. At the latest it stops when the basis spans the space, where the answer is
    exact, so it never returns an unconverged result.
    A dense ``eigh`` per concept would cost O(hidden^3) each; this needs ``apply`` on a few
    hundred columns and eigendecompositions of the small projected matrix.
    """
    m = min(m, n)
    width = min(m + oversample, n)
    gen = torch.Generator().manual_seed(seed)

    def fresh(k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=gen, dtype=torch.float32).to(device)

    first = fresh(width) if start is None else start.to(device, torch.float32)
    basis = _extend(torch.zeros(n, 0, device=device), first, fresh, min(max(first.shape[1], width), n))
    images = apply(basis)
    gram = basis.T @ images
    while True:
        gram = (gram + gram.T) / 2
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0)[:width], vectors.flip(1)[:, :width]
        ritz = basis @ vectors
        residuals = images @ vectors - ritz * values
        norms = residuals[:, :m].norm(dim=0)
        if basis.shape[1] >= n or bool((norms <= tol * values[:m].abs().max().clamp_min(1e-30)).all()):
            return values[:m], ritz[:, :m]
        block = _extend(basis, residuals, fresh, min(width, n - basis.shape[1]))
        block_images = apply(block)
        cross = basis.T @ block_images
        gram = torch.cat([torch.cat([gram, cross], 1), torch.cat([cross.T, block.T @ block_images], 1)])
        basis = torch.cat([basis, block], 1)
        images = torch.cat([images, block_images], 1)


def _extend(
    basis: torch.Tensor, w: torch.Tensor, fresh: Callable[[int], torch.Tensor], want: int
) -> torch.Tensor:
    """``want`` orthonormal columns, orthogonal to ``basis``, from ``w`` first and random ones after.

    Columns of ``w`` that vanish against ``basis`` (the space found so far is invariant, or
    ``w`` is rank deficient) are made up with random vectors, so the basis keeps growing
    toward the whole space. Orthonormalisation is by the eigenvectors of the small Gram matrix
    in float64, strongest directions first.
    """
    out = torch.zeros(basis.shape[0], 0, dtype=basis.dtype, device=basis.device)
    for _ in range(4):
        w = w / w.norm(dim=0).clamp_min(1e-30)
        done = torch.cat([basis, out], 1)
        for _ in range(2):  # classical Gram-Schmidt twice is orthogonal to working precision
            w = w - done @ (done.T @ w)
        w64 = w.double()
        lam, vec = torch.linalg.eigh(w64.T @ w64)
        keep = lam > 1e-10  # the columns had norm 1: a residual below 1e-5 is gone
        vec, lam = vec[:, keep].flip(1), lam[keep].flip(0)
        out = torch.cat([out, (w64 @ (vec / lam.sqrt())).to(basis.dtype)], 1)[:, :want]
        if out.shape[1] == want:
            return out
        w = fresh(want - out.shape[1])
    raise RuntimeError("could not extend the eigensolver's basis: the operator's space is exhausted")


def weighted_direction(values: torch.Tensor, vectors: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
    """Sum of the eigenvectors weighted by max(eigenvalue, 0), each signed to agree with ``toward``.

    An eigenvector's sign is arbitrary (a projector cannot tell v from -v); ``toward`` (the
    positives' pooled mean minus the negatives') says which end is the concept.
    """
    sign = torch.sign(vectors.T @ toward.to(vectors))
    sign[sign == 0] = 1
    return vectors @ (values.clamp_min(0) * sign)


def subspace(
    pooled: torch.Tensor,
    positives: Sequence[torch.Tensor],
    negatives: Sequence[torch.Tensor],
    layer: int,
    *,
    tokens: TokenSubspaces | None = None,
    eigen_k: int = 5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[n_concepts, hidden] directions at ``layer`` and ``{"subspace_eigenvalues": [n_concepts, 20]}``.

    Rows that are in neither a concept's positives nor its negatives (held-out texts) are taken
    out of S_all, so the result equals a fit on a store that never saw them. That correction is
    a dense hidden x hidden matrix formed once per distinct held-out set: leave-one-story-out
    holds out the same texts for every concept of a fold.
    """
    if tokens is None:
        raise AmygdalaError(
            "--method subspace needs per-token activations: collect with on_tokens=TokenSubspaces(...).add"
        )
    seen = set(tokens.bases[layer])
    n = tokens.hidden
    held_out: tuple[int, ...] = ()
    base = tokens.total[layer]  # S_all minus the projectors of the held-out texts
    directions, eigenvalues = [], []
    for pos, neg in zip(positives, negatives):
        pos_rows, neg_rows = pos.tolist(), neg.tolist()
        if not pos_rows or not neg_rows:
            raise ValueError("subspace needs at least one positive and one negative per concept")
        neg_set = set(neg_rows)
        others = tuple(sorted(seen - neg_set - set(pos_rows)))  # neither positive nor negative
        if len(neg_rows) + len(pos_rows) + len(others) != len(seen) or not neg_set <= seen:
            raise ValueError(f"layer {layer}: positives and negatives overlap or name texts without a token basis")
        if others != held_out:
            v_held = tokens.stack(layer, list(others))
            held_out, base = others, tokens.total[layer] - v_held.T @ v_held
        v_pos = tokens.stack(layer, pos_rows)
        # D q = S_pos q / n_pos - (S_all - S_held - S_pos) q / n_neg
        w_pos, w_base = 1 / len(pos_rows) + 1 / len(neg_rows), 1 / len(neg_rows)

        def apply(q: torch.Tensor, v_pos=v_pos, w_pos=w_pos, w_base=w_base, base=base) -> torch.Tensor:
            return w_pos * (v_pos.T @ (v_pos @ q)) - w_base * (base @ q)

        # Start from the positives' token subspaces: the wanted eigenvectors live mostly there
        # (outside them D = -M_neg is negative), so few corrections are needed.
        values, vectors = top_eigenpairs(
            apply, n, max(eigen_k, EIGENVALUES_KEPT), device=tokens.device, start=v_pos.T
        )
        toward = pooled[pos].mean(0) - pooled[neg].mean(0)
        k = min(eigen_k, len(values))
        directions.append(weighted_direction(values[:k], vectors[:, :k], toward).cpu())
        eigenvalues.append(values[:EIGENVALUES_KEPT].cpu())
    return torch.stack(directions), {"subspace_eigenvalues": torch.stack(eigenvalues)}
