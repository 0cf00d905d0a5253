"""Loading time and peak memory of a full-size SD 1.x checkpoint, side by side.

Writes a random checkpoint of the real SD 1.x size in the original layout (fp16, as
community models ship: about 2 GB as .safetensors, the same as .ckpt), then in a fresh
process each measures `load_model` at 512x512 from:

    random          KerasCV's architecture with random weights (the building cost alone)
    safetensors     the single file
    ckpt            the same tensors as a PyTorch .ckpt (restricted unpickler)
    convert         `sdanim convert` (load + write KerasCV .h5 files)
    h5 dir          the converted folder (--weights DIR)

and prints seconds and peak resident memory (the child's VmHWM). Files are reused
from --work when present. Needs torch,
diffusers and transformers (test dependencies) to write the checkpoint.

    python benchmarks/checkpoint_load.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, sys, time
start = time.perf_counter()
from sdanim.model.loading import convert_checkpoint, load_model
kind, source, out = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "convert":
    convert_checkpoint(source, out)
else:
    model = load_model(weights=source, height=512, width=512, precision="float32", jit_compile=False)
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_gib": hwm_kib / 2**20}))
"""


def write_checkpoint(folder: str) -> tuple:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch

    import sd_reference as ref

    models = ref.build("1.4")
    original = ref.to_original(ref.diffusers_state(models), "1.4")
    single = os.path.join(folder, "sd1-random.safetensors")
    ref.save_safetensors(original, single, dtype=torch.float16)
    ckpt = os.path.join(folder, "sd1-random.ckpt")
    torch.save({"state_dict": {k: v.half() for k, v in original.items()}}, ckpt)
    return single, ckpt


def run(kind: str, source: str, out: str = "-") -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, source, out], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the ~6 GB of files (default: a temp folder)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="sdanim-ckpt-")
    os.makedirs(work, exist_ok=True)
    t = time.perf_counter()
    single, ckpt = (os.path.join(work, "sd1-random" + s) for s in (".safetensors", ".ckpt"))
    if not (os.path.isfile(single) and os.path.isfile(ckpt)):
        single, ckpt = write_checkpoint(work)
    print(f"random full-size SD 1.x checkpoint ready in {time.perf_counter() - t:.0f} s: "
          f"{os.path.getsize(single) / 2**30:.2f} GiB .safetensors, {os.path.getsize(ckpt) / 2**30:.2f} GiB .ckpt")
    converted = os.path.join(work, "converted")
    rows = [
        ("random (build only)", run("load", "random")),
        (".safetensors", run("load", single)),
        (".ckpt", run("load", ckpt)),
        ("convert -> .h5", run("convert", single, converted)),
        ("--weights DIR (.h5)", run("load", converted)),
    ]
    print(f"{'source':<22}{'seconds':>9}{'peak RSS GiB':>14}")
    for name, r in rows:
        print(f"{name:<22}{r['seconds']:>9.1f}{r['peak_rss_gib']:>14.2f}")
    print(f"(machine: {os.cpu_count()} CPUs; load_model at 512x512, float32, building included; "
          "peak RSS = the child's VmHWM)")


if __name__ == "__main__":
    main()
