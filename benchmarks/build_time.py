"""Time to the first frame: where building the Stable Diffusion model goes.

    python benchmarks/build_time.py                 # SD 1.4, 512x512, random weights
    python benchmarks/build_time.py --size 128 --profile 25

Builds each sub-model the way `sdanim.load_model` does and prints, per part, the wall
time split into: creating and initialising the variables (the initializers' random
draws), the Keras functional graph (layers called on symbolic inputs), and the rest;
the same part built the way `load_model` builds parts whose weights are loaded next
(no random draws); then the time to bind KerasCV-format .h5 weights into a built model
(what loading the real weights adds). With --profile N, the N costliest functions of
the UNet build (cProfile, cumulative).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class Clock:
    """Adds up the wall time spent inside the wrapped functions (outermost calls only)."""

    def __init__(self):
        self.total = 0.0
        self.depth = 0

    def wrap(self, fn):
        clock = self

        def timed(*args, **kwargs):
            clock.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.depth -= 1
                if clock.depth == 0:
                    clock.total += time.perf_counter() - start

        return timed


@contextlib.contextmanager
def initializer_clock():
    """Times every Keras initializer call (the random draws of the variables)."""
    from keras.src.initializers.initializer import Initializer

    clock = Clock()
    patched = []
    classes = [Initializer] + _subclasses(Initializer)
    for cls in classes:
        if "__call__" in cls.__dict__:
            original = cls.__dict__["__call__"]
            setattr(cls, "__call__", clock.wrap(original))
            patched.append((cls, original))
    try:
        yield clock
    finally:
        for cls, original in patched:
            setattr(cls, "__call__", original)


def _subclasses(cls):
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default="1.4", choices=("1.4", "2.1"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--skip-h5", action="store_true", help="do not time binding .h5 weights")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import keras
    import keras_cv  # noqa: F401 - its import is part of the first frame's cost

    import_s = time.perf_counter() - t0
    from sdanim.model.loading import _builders

    builders = _builders(args.version, args.size, args.size)
    print(f"backend={keras.backend.backend()} keras={keras.__version__} version={args.version} "
          f"size={args.size}  import keras + keras_cv: {import_s:.1f} s")
    built = {}
    for part in ("text_encoder", "diffusion_model", "decoder"):
        keras.utils.set_random_seed(0)
        profiler = cProfile.Profile() if (args.profile and part == "diffusion_model") else None
        with initializer_clock() as init:
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            model = builders[part]()
            if profiler:
                profiler.disable()
            total = time.perf_counter() - start
        params = model.count_params()
        print(f"{part:16s} {total:6.1f} s  ({params / 1e6:6.1f}M parameters): variable initializers "
              f"{init.total:5.1f} s ({init.total / total:4.0%}), the rest (layers, functional graph) "
              f"{total - init.total:5.1f} s")
        built[part] = model
        from sdanim.model.loading import _weights_loaded_later

        start = time.perf_counter()
        with _weights_loaded_later():
            builders[part]()
        skipped = time.perf_counter() - start
        print(f"{'':16s} {skipped:6.1f} s  built for weights loaded next (no random draws, as "
              f"load_model builds for KerasCV files and checkpoints): {total / skipped:.2f}x faster")
        if profiler:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.profile)
            print(text.getvalue())

    if not args.skip_h5:
        with tempfile.TemporaryDirectory() as tmp:
            for part, model in built.items():
                path = os.path.join(tmp, f"{part}.weights.h5")
                model.save_weights(path)
                start = time.perf_counter()
                model.load_weights(path)
                print(f"{part:16s} binding its .h5 weights: {time.perf_counter() - start:5.1f} s "
                      f"({os.path.getsize(path) / 1e9:.2f} GB)")
                os.remove(path)


if __name__ == "__main__":
    main()
