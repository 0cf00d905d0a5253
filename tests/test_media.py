"""Video formats, frame doubling, audio-driven timing and muxing."""

import subprocess
import wave

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest

import sdanim
from sdanim.core.audio import audio_positions
from sdanim.formats.audio import analyze_audio, read_audio
from sdanim.config.errors import SdanimError
from sdanim.render.export import blend_double, write_mp4
from sdanim.config.settings import RenderSettings

S = RenderSettings(height=64, width=64, num_steps=2, batch_size=4)


def _wav(path, seconds=2.0, rate=8000, bursts=((0.5, 0.75),), channels=1, width=2):
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.01 * np.sin(2 * np.pi * 220 * t)
    for a, b in bursts:
        signal[(t >= a) & (t < b)] = 0.9 * np.sin(2 * np.pi * 440 * t[(t >= a) & (t < b)])
    data = (signal * 32767).astype(np.int16)
    data = np.repeat(data[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(data.tobytes())
    return str(path)


def _streams(path):
    """ffmpeg's own description of the file's streams (no ffprobe needed)."""
    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return [line.strip() for line in proc.stderr.splitlines() if "Stream #" in line]


def test_webm_round_trip(tmp_path):
    frames = [np.full((64, 64, 3), 30 * k, np.uint8) for k in range(6)]
    write_mp4(str(tmp_path / "a.webm"), frames, fps=6)
    reader = imageio.get_reader(str(tmp_path / "a.webm"), format="FFMPEG")
    assert sum(1 for _ in reader) == 6 and abs(reader.get_meta_data()["fps"] - 6) < 1e-6
    reader.close()
    assert any("vp9" in s for s in _streams(tmp_path / "a.webm"))


def test_blend_double():
    frames = [np.full((2, 2, 3), v, np.uint8) for v in (0, 100, 201)]
    out = blend_double(frames)
    assert [int(f[0, 0, 0]) for f in out] == [0, 50, 100, 151, 201]
    looped = blend_double(frames, loop=True)
    assert len(looped) == 6 and int(looped[-1][0, 0, 0]) == 101


def test_read_audio_and_strength(tmp_path):
    samples, rate = read_audio(_wav(tmp_path / "a.wav", channels=2))  # 8 kHz stereo, resampled to mono 22.05 kHz
    assert rate == 22050 and samples.ndim == 1 and abs(len(samples) - 2 * 22050) <= 1
    analysis = analyze_audio(samples, rate)
    strength = analysis.per_frame("loudness", num_frames=8, fps=4)  # 0.25 s per frame
    assert np.argmax(strength) == 2  # the burst is 0.5-0.75 s
    onsets = analysis.per_frame("onsets", num_frames=8, fps=4)
    assert np.argmax(onsets) == 2 and onsets[2] > 3 * onsets[4]


def test_audio_positions_move_on_the_beat():
    strength = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    pos = audio_positions(strength, path_length=1.0)
    steps = np.diff(pos)
    assert pos[0] == 0 and pos[-1] == pytest.approx(1.0)
    assert steps[2] > 5 * steps[0]  # the loud frame moves on much further
    loop = audio_positions(strength, path_length=2.0, include_end=False)
    assert loop[-1] < 2.0


def test_not_audio_is_refused(tmp_path):
    (tmp_path / "x.wav").write_bytes(b"this is not audio")
    with pytest.raises(SdanimError, match=r"cannot read the audio .*Received: audio='.*x\.wav'"):
        read_audio(str(tmp_path / "x.wav"))
    with pytest.raises(SdanimError, match=r"the audio file does not exist"):
        read_audio(str(tmp_path / "missing.wav"))


def test_audio_synced_morph_is_muxed(tiny, tmp_path):
    wav = _wav(tmp_path / "beat.wav", seconds=2.0, bursts=((0.5, 0.75), (1.25, 1.5)))
    result = sdanim.morph(["a red cube", "a blue sphere"], out=str(tmp_path / "m.mp4"), frames=8,
                          export=sdanim.ExportSettings(fps=4, audio=wav), settings=S, model=tiny, progress=False)
    streams = _streams(result.out)
    assert any("Video: h264" in s for s in streams) and any("Audio: aac" in s for s in streams)
    reader = imageio.get_reader(result.out, format="FFMPEG")
    assert sum(1 for _ in reader) == 8
    reader.close()
    with pytest.raises(SdanimError, match=r"a GIF cannot carry audio; write \.mp4 or \.webm\. Received: out='.*g\.gif'"):
        sdanim.morph(["a", "b"], out=str(tmp_path / "g.gif"), frames=8, export=sdanim.ExportSettings(fps=4, audio=wav), settings=S, model=tiny, progress=False)
    assert not (tmp_path / "g_frames").exists()  # refused before anything was rendered


def test_cli_bad_audio_is_one_line_before_model_build(capsys, tmp_path):
    from sdanim.frontends.cli import main

    (tmp_path / "x.wav").write_text("not audio")
    assert main(["morph", "a", "b", "--out", str(tmp_path / "m.mp4"), "--audio", str(tmp_path / "x.wav"),
                 "--weights", str(tmp_path / "no-weights-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: cannot read the audio") and err.count("\n") == 1


def test_doubled_video_has_twice_the_frames_and_fps(tiny, tmp_path):
    result = sdanim.morph(["a", "b"], out=str(tmp_path / "d.mp4"), frames=5, export=sdanim.ExportSettings(fps=5, double=True),
                          settings=S, model=tiny, progress=False)
    reader = imageio.get_reader(result.out, format="FFMPEG")
    assert sum(1 for _ in reader) == 9 and abs(reader.get_meta_data()["fps"] - 10) < 1e-6
    reader.close()
