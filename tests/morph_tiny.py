"""A morph with the tiny models, as a separate process (killed mid-run by a test).

python morph_tiny.py OUT.gif [MODE]: MODE "0" runs straight through; "hold-write"
writes frame 4's PNG to its temporary name, touches OUT.gif + ".writing" and waits
there (before the rename), so a test can kill the process in the middle of a write.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(out, mode="0"):
    import sdanim
    from sdanim.render import store as frames
    from tiny import make_tiny_model

    if mode == "hold-write":
        atomic_write = frames.atomic_write

        def held_write(path, write):
            def write_then_hold(tmp):
                write(tmp)
                if os.path.basename(path) == "frame_00004.png":
                    open(out + ".writing", "w").close()
                    time.sleep(120)  # killed here, the frame under its temporary name

            atomic_write(path, write_then_hold)

        frames.atomic_write = held_write
    settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
    result = sdanim.morph(["a red cube", "a blue sphere"], out=out, frames=9, export=sdanim.ExportSettings(fps=5), seed=1,
                          settings=settings, model=make_tiny_model(), progress=False)
    print("rendered", result.rendered)


if __name__ == "__main__":
    main(*sys.argv[1:])
