"""2D / 3D coordinates of the reduced trajectory matrix (PCA, t-SNE, UMAP when installed)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def available_projections(requested: Iterable[str]) -> list[str]:
    """``requested`` minus ``umap`` when umap-learn is not installed."""
    out = []
    for method in requested:
        if method == "umap":
            try:
                import umap  # noqa: F401
            except ImportError:
                continue
        out.append(method)
    return out


def embed(matrix: np.ndarray, method: str, n_components: int, seed: int = 0) -> np.ndarray:
    """2D/3D coordinates of the rows of ``matrix`` (the joint policy+reward reduced matrix).

    ``pca``: sklearn PCA (linear: angles of the projected steps keep a meaning).
    ``tsne``: sklearn t-SNE, PCA init, perplexity ``min(30, (n - 1) / 3)`` (at least 1) so that a
    few dozen points work. ``umap``: umap-learn with ``n_neighbors = min(15, n - 1)``.
    Fewer rows or columns than ``n_components`` are padded with zero coordinates.
    """
    x = np.asarray(matrix, dtype=float)
    n = len(x)
    k = min(n_components, n, x.shape[1])
    if method == "pca":
        from sklearn.decomposition import PCA

        y = PCA(n_components=k, random_state=seed).fit_transform(x) if k > 0 else np.zeros((n, 0))
    elif method == "tsne":
        from sklearn.manifold import TSNE

        if n < 3:
            y = x[:, :k] - x[:, :k].mean(0)
        else:
            from threadpoolctl import threadpool_limits

            perplexity = float(max(1.0, min(30.0, (n - 1) / 3.0)))
            # one OpenMP thread: on a few hundred points it is as fast, and busy-waiting OpenMP
            # threads slow t-SNE down ~10x on a shared, oversubscribed node
            with threadpool_limits(limits=1, user_api="openmp"):
                y = TSNE(
                    n_components=n_components,
                    perplexity=perplexity,
                    init="pca",
                    random_state=seed,
                    method="barnes_hut" if n_components < 4 else "exact",
                    max_iter=1000,
                ).fit_transform(x)
    elif method == "umap":
        import umap

        y = umap.UMAP(n_components=n_components, n_neighbors=max(2, min(15, n - 1)), random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"unknown projection {method!r} (pca, tsne, umap)")
    if y.shape[1] < n_components:
        y = np.hstack([y, np.zeros((n, n_components - y.shape[1]))])
    return y
