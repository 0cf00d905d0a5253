"""A morph with the tiny models, as a separate process (killed mid-run by a test).

python morph_tiny.py OUT.gif [SLOW_SECONDS]: sleeps SLOW_SECONDS after each batch so a
test can interrupt it between or during batches.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(out, slow="0"):
    import sdanim
    from sdanim import sampling
    from tiny import make_tiny_model

    delay = float(slow)
    if delay:
        render = sampling.Renderer.render

        def slow_render(self, *args):
            images = render(self, *args)
            time.sleep(delay)
            return images

        sampling.Renderer.render = slow_render
    settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
    result = sdanim.morph(["a red cube", "a blue sphere"], out=out, frames=9, fps=5, seed=1,
                          settings=settings, model=make_tiny_model(), progress=False)
    print("rendered", result.rendered)


if __name__ == "__main__":
    main(*sys.argv[1:])
