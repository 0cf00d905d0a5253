"""A morph with the tiny models, as a separate process (killed mid-run by a test).

python morph_tiny.py OUT.gif [MODE]: MODE "0" runs straight through; "hold-write"
writes frame 4's PNG to its temporary name, touches OUT.gif + ".writing" and waits
there (before the rename), so a test can kill the process in the middle of a write.
"motion" renders a 7-frame clip (3 windows, 3 steps) with random motion modules, its state
saved after every window;
"motion-hold" does so, touches OUT.gif + ".writing" once the state after the second
window of step 1 is saved (mid-step) and waits there.
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
    if mode.startswith("motion"):
        return motion(out, hold=mode == "motion-hold")
    settings = sdanim.RenderSettings(height=64, width=64, num_steps=2, batch_size=2)
    result = sdanim.morph(["a red cube", "a blue sphere"], out=out, frames=9, export=sdanim.ExportSettings(fps=5), seed=1,
                          settings=settings, model=make_tiny_model(), progress=False)
    print("rendered", result.rendered)


def motion(out, hold=False):
    import functools

    import sdanim
    from sdanim.render import motion as motion_render
    from tiny import make_tiny_sd_model

    sample, save = motion_render.sample_clip, motion_render.ClipState.save
    motion_render.sample_clip = functools.partial(sample, save_every=0.0)
    if hold:

        def save_then_hold(self, path, key):
            save(self, path, key)
            if (self.step, self.window) == (1, 2):
                open(out + ".writing", "w").close()
                time.sleep(120)  # killed here, mid-step, the state on disk

        motion_render.ClipState.save = save_then_hold
    settings = sdanim.RenderSettings(height=64, width=64, num_steps=3, guidance_scale=1.0, batch_size=4)
    try:
        result = sdanim.morph(["a red cube", "a blue sphere", "a green cone"], out=out, frames=7, seed=1,
                              settings=settings, model=make_tiny_sd_model(context_dim=768), progress=False,
                              motion=sdanim.MotionSpec("random", context=4, stride=2))
    finally:  # this process's other renders as they were (a test calls it in its own)
        motion_render.sample_clip, motion_render.ClipState.save = sample, save
    print("rendered", result.rendered)


if __name__ == "__main__":
    main(*sys.argv[1:])
