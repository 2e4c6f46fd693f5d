"""The quality metrics as functions of tensors: no model and no files, so that each one can be
checked on synthetic activations and vectors where the right answer is known.

Conventions: ``vectors`` are [n_concepts, hidden] unit rows; ``x`` are pooled activations
[n_texts, width] of one site; ``pos`` / ``neg`` are row indices into ``x``. Everything runs in
float64 on the CPU: the matrices are small (concepts x concepts, texts x hidden) and the ridge
and eigenvalue steps are sensitive to rounding when concepts are near-collinear.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread inside the block. The report's matrices are small (a few hundred
    rows): threads gain nothing there, and on a machine whose cores are busy their spin-waits
    made one 200 x 200 eigendecomposition take seconds instead of milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def nearest_concepts(cos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar other concepts of each concept: (indices [C, k], cosines [C, k])."""
    masked = cos.clone().fill_diagonal_(float("-inf"))
    values, idx = masked.topk(min(k, cos.shape[0] - 1), dim=1)
    return idx, values


def first_pc(pos: torch.Tensor, neg_mean: torch.Tensor, vector: torch.Tensor) -> tuple[float | None, torch.Tensor]:
    """(first-PC variance ratio, per-text alignment) of one concept's positives.

    The positives are centred on the *negatives'* mean, i.e. taken as offsets from "not this
    concept", the same offsets diff-of-means averages. The ratio is the share of their second
    moment on its first principal axis: near 1 when every text moves the same way, about 1/k
    when the texts fall into k unrelated groups. Centring on the positives' own mean instead
    would measure the largest spread *within* the concept, and two story groups would then look
    like one clean axis. The alignment of a text is the cosine of its offset with the vector.
    None when there are fewer than two positives (one text always has ratio 1).
    """
    d = pos.double() - neg_mean.double()
    align = torch.nn.functional.cosine_similarity(d, vector.double()[None], dim=1)
    if d.shape[0] < 2:
        return None, align
    eig = torch.linalg.eigvalsh(d @ d.T)  # the n x n Gram has the same nonzero spectrum
    total = float(eig.sum())
    return (float(eig[-1]) / total if total > 0 else None), align


def ridge_redundancy(vectors: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of each concept vector on all the others: (R^2 [C], coefficients [C, C]).

    ``coef[i, j]`` is concept j's weight in the fit of concept i (``coef[i, i] = 0``). The
    hidden dimensions are the samples and there is no intercept, so R^2 = 1 - |residual|^2 /
    |v_i|^2 (what share of the direction its peers rebuild). All C regressions come from one
    inverse: with P = (G + lam I)^-1 for the Gram matrix G, the fit of i on the rest is
    beta = -P[others, i] / P[i, i] (block inversion), the same as C separate ridge solves.
    """
    v = vectors.double()
    c = v.shape[0]
    gram = v @ v.T
    if c < 2:
        return torch.zeros(c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64)
    p = torch.linalg.inv(gram + lam * torch.eye(c, dtype=torch.float64))
    beta = -p / p.diagonal()[None, :]  # column i: the coefficients of concept i's fit
    beta.fill_diagonal_(0.0)
    fit_dot = (beta * gram).sum(0)  # beta_i . G[others, i]
    # |v_i - X beta|^2 = G_ii - 2 b.beta + beta.G_oo.beta and G_oo beta = b - lam beta.
    residual = gram.diagonal() - fit_dot - lam * (beta * beta).sum(0)
    r2 = 1.0 - residual / gram.diagonal().clamp_min(1e-12)
    return r2, beta.T.contiguous()


def membership(rows: list[torch.Tensor], n_texts: int) -> torch.Tensor:
    """[C, n_texts] float64 0/1 matrix of each concept's rows: group means become one matmul."""
    m = torch.zeros(len(rows), n_texts, dtype=torch.float64)
    for i, r in enumerate(rows):
        m[i, r] = 1.0
    return m


def group_means(x: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """[C, width]: the mean of each concept's rows of ``x`` (``member`` from :func:`membership`)."""
    return (member @ x.double()) / member.sum(1, keepdim=True).clamp_min(1.0)


def neuron_alignment(vectors: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best |cosine| between each vector and a column of the down projection ``down`` [hidden,
    neurons] (the direction neuron j writes): (neuron index [C], signed cosine [C])."""
    cos = unit_rows(vectors.double()) @ unit_rows(down.double().T).T
    idx = cos.abs().argmax(dim=1)
    return idx, cos.gather(1, idx[:, None])[:, 0]


def neuron_contributions(vectors: torch.Tensor, down: torch.Tensor, act_diff: torch.Tensor) -> torch.Tensor:
    """[C, neurons]: what each neuron adds along each concept's vector at the read token, as in
    Wang et al. 2025: its activation (positives' mean minus negatives' mean, ``act_diff``) times
    its down-projection column's projection on the vector. The row sum is the whole MLP's."""
    return act_diff.double() * (vectors.double() @ down.double())


def head_stats(
    x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, n_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per concept and head, from the attention output projection's input ``x`` [n_texts,
    heads*head_dim] and membership matrices ``pos`` / ``neg`` [C, n_texts]: (norm of the diff
    of means [C, H], selectivity [C, H]).

    Selectivity is that norm over the standard deviation of the negatives' projections on the
    head's own diff direction: how many negative-spreads apart the positives sit in that head.
    """
    xd = x.double()
    n_texts = xd.shape[0]
    neg_mean = group_means(xd, neg)
    diff = (group_means(xd, pos) - neg_mean).reshape(len(pos), n_heads, -1)
    norms = diff.norm(dim=2)
    u = diff / norms[..., None].clamp_min(1e-12)
    proj = torch.einsum("nhd,chd->cnh", xd.reshape(n_texts, n_heads, -1), u)
    n = neg.sum(1).clamp_min(1.0)[:, None]
    mean = torch.einsum("cn,cnh->ch", neg, proj) / n
    var = torch.einsum("cn,cnh->ch", neg, proj**2) / n - mean**2
    std = (var.clamp_min(0.0) * n / (n - 1).clamp_min(1.0)).sqrt()  # unbiased, like Tensor.std
    return norms, norms / std.clamp_min(1e-12)


def concentration(norms: torch.Tensor, k: int) -> float:
    """Share of the total head norm held by the ``k`` largest heads."""
    total = float(norms.sum())
    return float(norms.topk(min(k, len(norms))).values.sum()) / total if total > 0 else 0.0


def cluster_similarity(cos: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """[C, K] cosine of each concept with each cluster's centroid (the normalised sum of its
    members' unit vectors), leaving the concept itself out of its own cluster so that it is
    judged by its peers. NaN where a cluster has no member left."""
    m = torch.nn.functional.one_hot(labels, n_clusters).double()
    dot_all = cos @ m  # sum over members j of cos(i, j), self included
    own = m
    within = (m.T @ cos @ m).diagonal()  # |sum of members|^2
    dot = dot_all - own * cos.diagonal()[:, None]
    norm2 = within[None, :] - own * (2 * dot_all - cos.diagonal()[:, None])
    count = m.sum(0)[None, :] - own
    sim = dot / norm2.clamp_min(1e-12).sqrt()
    return torch.where(count > 0, sim, torch.full_like(sim, float("nan")))


def cohesion(cos: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """[K] mean within-cluster cosine minus mean between-cluster cosine (NaN when a cluster has
    one member or holds every concept: one of the two means does not exist)."""
    m = torch.nn.functional.one_hot(labels, n_clusters).double()
    size = m.sum(0)
    c = cos.shape[0]
    within_sum = (m.T @ cos @ m).diagonal() - size  # drop the diagonal (cos(i, i) = 1)
    between_sum = (m.T @ cos).sum(1) - (m.T @ cos @ m).diagonal()
    within = within_sum / (size * (size - 1))
    between = between_sum / (size * (c - size))
    out = within - between
    ok = (size > 1) & (size < c)
    return torch.where(ok, out, torch.full_like(out, float("nan")))


def geometry(vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA over the concept vectors (:func:`amygdala.validity.geometry.pca`): (explained-variance
    ratio of the top ``k`` components, scores on the first two [C, 2])."""
    from amygdala.validity.geometry import pca

    scores, ratio = pca(vectors, max(k, 2))
    return ratio[:k], scores[:, :2]
