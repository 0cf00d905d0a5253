"""Notebook helpers: the functions the seed notebook writes by hand, and figures of a run."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from sdanim.render.plots import smoothness_figure
from sdanim.render.store import write_png


def plot_images(images: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None, columns: Optional[int] = None, size: float = 4.0):
    """Shows images side by side with matplotlib; returns the figure.

    Example:
    ```python
    plot_images(sdanim.generate("a cat", num_images=3).images)
    ```
    """
    import matplotlib.pyplot as plt

    images = list(images)
    columns = columns or min(len(images), 4)
    rows = int(math.ceil(len(images) / columns))
    fig = plt.figure(figsize=(size * columns, size * rows))
    for k, image in enumerate(images):
        ax = fig.add_subplot(rows, columns, k + 1)
        image = np.asarray(image)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)  # masks in grey
        if titles is not None:
            ax.set_title(titles[k])
        ax.axis("off")
    return fig


def save_image(image: np.ndarray, path: str) -> str:
    """Saves one (H, W, 3) uint8 image as PNG (atomically); returns the path."""
    write_png(path, image)
    return path


def show_gif(path: str):
    """Displays a GIF inline in Jupyter or Colab."""
    from IPython.display import Image, display

    with open(path, "rb") as f:
        image = Image(data=f.read(), format="gif")
    display(image)
    return image


def show_image(path: str):
    """Displays a PNG (a contact sheet, an audio plot) inline in Jupyter or Colab."""
    from IPython.display import Image, display

    with open(path, "rb") as f:
        image = Image(data=f.read(), format="png")
    display(image)
    return image


def plot_smoothness(results: dict):
    """Consecutive-frame distances of several renders, one curve each ({label: a
    `MorphResult` or its `smoothness` report}): a flat curve is an even walk, a spike a
    hard cut; AID's 1 - Gini in the legend. Returns the matplotlib figure.

    Example:
    ```python
    sdanim.plot_smoothness({"lerp": plain, "attention": sdanim.morph(..., attention_interp="fused")})
    ```
    """
    return smoothness_figure({label: getattr(r, "smoothness", r) for label, r in results.items()})
