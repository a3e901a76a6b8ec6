"""A 2-D map of an encoder's validation embeddings, coloured by class: what SupCon does to the geometry.

`supcon-scale embed-plot --checkpoint ENC --data DIR` encodes DIR/val with the frozen encoder, L2-normalises the
features (the contrastive loss compares directions), reduces them to two dimensions with UMAP when `umap-learn` is
installed, else scikit-learn's t-SNE, and writes a scatter plot. The map shows neighbourhoods, not distances between
far clusters (t-SNE and UMAP keep local structure only).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from supcon_scale import arguments
from supcon_scale.evaluation.plots import _pyplot, _save

Method = Literal["auto", "tsne", "umap"]


def reduce_2d(features: np.ndarray, method: Method = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """([N, 2] coordinates, the method used) of the rows of `features`; `auto`: UMAP when installed, else t-SNE."""
    if method == "auto":
        method = "umap" if importlib.util.find_spec("umap") is not None else "tsne"
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ValueError("--method umap needs umap-learn: pip install umap-learn (or use --method tsne)") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(features), "UMAP"
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))  # t-SNE needs perplexity < N
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(features), "t-SNE"


def plot_embedding(
    coords: np.ndarray, labels: np.ndarray, classes: list[str], path: str | Path, title: str, ax=None
) -> Path | None:
    """A scatter of `coords` coloured by class (tab10/tab20 colours, a legend per class); into `ax` when given."""
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 5.5), dpi=120)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        keep = labels == c
        ax.scatter(coords[keep, 0], coords[keep, 1], s=9, color=cmap(c % cmap.N), label=name, alpha=0.8, lw=0)
    ax.set_xlabel("dimension 1")
    ax.set_ylabel("dimension 2")
    ax.set_title(title)
    if len(classes) <= 20:
        ax.legend(title="class", fontsize=7, markerscale=1.8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(plt, fig, path) if fig is not None else None


def embed(
    checkpoint: str | Path,
    data: str | Path,
    image_size: int | None = None,
    device: str | None = None,
    max_images: int | None = 2000,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(normalised features [N, D], labels [N], class names) of DIR/val under the encoder `checkpoint`.

    `max_images` keeps an evenly spaced subset (t-SNE is quadratic in N); None keeps every image."""
    from supcon_scale.data.eval import EvalDataset
    from supcon_scale.evaluation.features import extract_features
    from supcon_scale.evaluation.linear import checkpoint_image_size
    from supcon_scale.export import encoder_from_export

    path = Path(checkpoint)
    path = path / "encoder.safetensors" if path.is_dir() else path
    encoder, meta = encoder_from_export(path)
    size = image_size or checkpoint_image_size(path, meta.get("cifar_stem") == "1")
    val = Path(data) / "val"
    if not val.is_dir():
        raise ValueError(f"--data {data}: no val/ folder (class folders of validation images)")
    dataset = EvalDataset(data, "val", size)
    if max_images is not None and len(dataset) > max_images:
        keep = np.linspace(0, len(dataset) - 1, max_images).round().astype(int)
        dataset = torch.utils.data.Subset(dataset, keep.tolist())
    feats, labels, _ = extract_features(encoder, dataset, device=device)
    feats = torch.nn.functional.normalize(feats, dim=1)
    classes = (dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset).index.classes
    return feats.numpy(), labels.numpy(), list(classes)


def main(argv: list[str] | None = None) -> int:
    """`supcon-scale embed-plot --checkpoint ENC --data DIR [--out PNG] [--method auto|tsne|umap]`."""
    args = arguments.embed_plot().parse_args(argv)
    from supcon_scale.evaluation.features import check_args

    check_args(args)
    if args.max_images is not None and args.max_images < 3:
        raise ValueError("--max-images must be >= 3")
    feats, labels, classes = embed(args.checkpoint, args.data, args.image_size, args.device, args.max_images)
    coords, used = reduce_2d(feats, args.method, args.seed)
    ckpt = Path(args.checkpoint)
    out = args.out or (ckpt if ckpt.is_dir() else ckpt.parent) / "embedding.png"
    title = f"{ckpt.name if ckpt.is_dir() else ckpt.parent.name}: {used} of {len(labels)} val embeddings"
    print(plot_embedding(coords, labels, classes, out, title), file=sys.stdout)
    return 0


def side_by_side(
    encoders: dict[str, Path],
    data: str | Path,
    path: str | Path,
    image_size: int | None = None,
    method: Method = "auto",
) -> Path:
    """The maps of several encoders on the same val images, one panel each (e.g. SupCon beside cross-entropy)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(encoders), figsize=(5.5 * len(encoders) + 1, 5), dpi=120, squeeze=False)
    for ax, (name, checkpoint) in zip(axes[0], encoders.items(), strict=True):
        feats, labels, classes = embed(checkpoint, data, image_size)
        coords, used = reduce_2d(feats, method)
        plot_embedding(coords, labels, classes, path, f"{name}: {used} of {len(labels)} val embeddings", ax=ax)
        if ax is not axes[0][-1]:
            ax.get_legend().remove()  # one legend, beside the last panel
    return _save(plt, fig, path)
