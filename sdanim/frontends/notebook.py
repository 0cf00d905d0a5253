"""Notebook helpers: the three functions the seed notebook writes by hand."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

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
