"""Ray started by sdanim, in a process of its own: never a cluster merely recorded on
disk."""

import os

from conftest import require

from test_distributed import HERE, _dead_port


def test_a_cluster_merely_recorded_on_disk_is_never_joined():
    """Ray records the last `ray start` cluster on disk and keeps the record after the
    cluster is killed. Without --ray-address sdanim starts its own local Ray (on
    loopback) instead of attaching to it; with --ray-address auto it says the recorded
    address does not answer, in time, instead of hanging."""
    import subprocess
    import sys
    import tempfile

    require("ray")
    short = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    os.makedirs(os.path.join(short, "ray"))
    dead = f"127.0.0.1:{_dead_port()}"
    with open(os.path.join(short, "ray", "ray_current_cluster"), "w") as f:
        f.write(dead)
    code = (
        "from sdanim.config.errors import SdanimError\n"
        "from sdanim.render.ray import _start_ray, check_reachable\n"
        "_start_ray(None)\n"
        "import ray\n"
        "print('joined', ray.get_runtime_context().gcs_address)\n"
        "ray.shutdown()\n"
        # Ray's "auto" prefers a Ray running on this machine to the record: another pytest-xdist
        # worker (or the real CLI test) may be running one; this test is about the record alone.
        "import ray._private.services as services\nservices.find_gcs_addresses = lambda: []\n"
        # Ray may have recorded its own (now stopping) instance: put the dead cluster's record back.
        f"open({os.path.join(short, 'ray', 'ray_current_cluster')!r}, 'w').write({dead!r})\n"
        "try:\n    check_reachable('auto', timeout=5)\nexcept SdanimError as e:\n    print('auto:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_TMPDIR=short, PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("joined 127.0.0.1:") and dead not in lines[0]  # its own Ray, on loopback
    assert lines[1].startswith(f"auto: the Ray cluster at {dead} did not answer") and "Received: ray_address='auto'" in lines[1]
