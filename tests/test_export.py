"""Export: GIF and MP4 read back with the right frames, size and timing; atomic writes."""

import os

import numpy as np
import pytest
from PIL import Image

from sdanim.config.errors import SdanimError
from sdanim.render.export import boomerang, contact_sheet, write_gif, write_mp4, write_video
from sdanim.config.export import output_format
from sdanim.render.store import FrameStore, atomic_write


def _frames(n=6, h=64, w=96):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_gif_frames_size_fps_loop(tmp_path):
    path = str(tmp_path / "a.gif")
    write_gif(path, _frames(6), fps=10)
    with Image.open(path) as im:
        assert im.n_frames == 6 and im.size == (96, 64)
        assert im.info["duration"] == 100 and im.info["loop"] == 0


def test_gif_ping_pong_does_not_repeat_ends(tmp_path):
    path = str(tmp_path / "a.gif")
    write_video(path, _frames(4), fps=8, ping_pong=True)
    with Image.open(path) as im:
        assert im.n_frames == 6  # 0 1 2 3 2 1
    assert [id(f) for f in boomerang([1, 2, 3])] == [id(1), id(2), id(3), id(2)]


def test_mp4_decodes_to_the_right_frames_and_fps(tmp_path):
    path = str(tmp_path / "a.mp4")
    frames = [np.full((64, 64, 3), 20 * k, np.uint8) for k in range(8)]
    write_mp4(path, frames, fps=12)
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    meta = reader.get_meta_data()
    decoded = [f for f in reader]
    reader.close()
    assert len(decoded) == 8
    assert decoded[0].shape == (64, 64, 3)
    assert abs(meta["fps"] - 12) < 1e-6
    # Mean brightness climbs with k (H.264 is lossy, so compare loosely).
    means = [f.mean() for f in decoded]
    assert all(b > a for a, b in zip(means, means[1:]))


def test_unknown_extension_is_refused():
    with pytest.raises(SdanimError, match=r"out must end in \.gif, \.mp4, \.webm\. Received: out='x\.avi'"):
        output_format("x.avi")


@pytest.mark.parametrize("fps", [0, -1, float("nan")])
def test_bad_fps_is_refused(tmp_path, fps):
    with pytest.raises(SdanimError, match=r"fps must be > 0\. Received: fps="):
        write_gif(str(tmp_path / "a.gif"), _frames(2), fps=fps)


def test_interrupted_write_leaves_no_file(tmp_path):
    path = str(tmp_path / "out.gif")

    def explode(tmp):
        with open(tmp, "wb") as f:
            f.write(b"GIF89a half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, explode)
    assert os.listdir(tmp_path) == []


def test_written_files_have_normal_permissions(tmp_path):
    store = FrameStore(str(tmp_path))
    store.write(0, _frames(1)[0])
    mode = os.stat(store.path(0)).st_mode & 0o777
    assert mode & 0o044, oct(mode)  # group/other can read, as with a plain open()


def test_contact_sheet_layout():
    frames = [np.full((10, 20, 3), k, np.uint8) for k in range(5)]
    sheet = contact_sheet(frames, columns=3, gap=2)
    assert sheet.shape == (2 * 10 + 2, 3 * 20 + 2 * 2, 3)
    assert sheet[0, 0, 0] == 0 and sheet[12, 0, 0] == 3 and sheet[12, 22, 0] == 4
    assert sheet[12, 50, 0] == 255  # empty cell stays white


def test_gif_uses_one_palette_sized_to_the_content(tmp_path):
    # A smooth two-colour fade: few distinct colours, so a small shared palette.
    frames = [np.tile(np.array([10 * k, 0, 255 - 10 * k], np.uint8), (32, 32, 1)) for k in range(8)]
    path = str(tmp_path / "fade.gif")
    write_gif(path, frames, fps=8)
    with Image.open(path) as im:
        palettes = set()
        decoded = []
        for i in range(im.n_frames):
            im.seek(i)
            palettes.add(bytes(im.getpalette() or b""))
            decoded.append(np.asarray(im.convert("RGB")).astype(int))
    assert len(palettes - {b""}) == 1  # one palette (later frames use the global one): no flicker
    for original, back in zip(frames, decoded):
        assert np.abs(original.astype(int) - back).max() <= 8


def test_gif_of_rich_frames_stays_close(tmp_path):
    frames = _frames(4)
    path = str(tmp_path / "rich.gif")
    write_gif(path, frames, fps=4)
    with Image.open(path) as im:
        im.seek(2)
        back = np.asarray(im.convert("RGB")).astype(int)
    assert np.abs(back - frames[2].astype(int)).mean() < 40  # random noise is the worst case for 256 colours
