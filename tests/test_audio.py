"""Audio from the files musicians have: the same music as 16-bit and float WAV, MP3,
AAC in M4A, FLAC, Ogg Vorbis and a video's sound track (made here with imageio-ffmpeg's
ffmpeg) gives the same strength curves and beats; beat-synced walks; bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave

import imageio_ffmpeg
import numpy as np
import pytest

import sdanim
from sdanim.config.errors import SdanimError
from sdanim.config.settings import RenderSettings
from sdanim.core import audio
from sdanim.formats import audio as audio_files
from sdanim.formats.audio import analyze_audio, analyze_audios, read_audio
from sdanim.frontends.cli import main

S = RenderSettings(height=64, width=64, num_steps=2, batch_size=4)
FPS = 12.0
BPM = 120.0
FORMATS = {  # name: ffmpeg output arguments
    "float.wav": ["-c:a", "pcm_f32le"],
    "music.mp3": ["-c:a", "libmp3lame", "-b:a", "192k"],
    "music.m4a": ["-c:a", "aac", "-b:a", "192k"],
    "music.flac": ["-c:a", "flac"],
    "music.ogg": ["-c:a", "libvorbis", "-q:a", "6"],
}


def _ffmpeg(*args) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *args], check=True, capture_output=True)


def _music(seconds: float = 8.0, rate: int = 44100) -> np.ndarray:
    """A drum loop at 120 BPM over a soft pad: a kick (a falling 60 Hz thump with a
    click) on every beat, a hi-hat between, a chord underneath. Stereo float in [-1, 1]."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    pad = 0.05 * (np.sin(2 * np.pi * 220 * t) + np.sin(2 * np.pi * 277 * t) + np.sin(2 * np.pi * 330 * t))
    out = pad.copy()
    beat = 60.0 / BPM
    for k in range(int(seconds / beat)):
        start = int(k * beat * rate)
        n = min(int(0.25 * rate), len(t) - start)
        tk = np.arange(n) / rate
        kick = 0.8 * np.exp(-tk * 18) * np.sin(2 * np.pi * (60 + 80 * np.exp(-tk * 30)) * tk)
        kick[: int(0.003 * rate)] += 0.5 * rng.standard_normal(int(0.003 * rate))
        out[start:start + n] += kick
        hat = int((k + 0.5) * beat * rate)
        m = min(int(0.05 * rate), len(t) - hat)
        if m > 0:
            out[hat:hat + m] += 0.15 * rng.standard_normal(m) * np.exp(-np.arange(m) / rate * 80)
    stereo = np.stack([out, 0.9 * out], axis=1)
    return np.clip(stereo, -1, 1).astype(np.float32)


def _write_wav16(path, data: np.ndarray, rate: int = 44100) -> str:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(data.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((data * 32767).astype("<i2").tobytes())
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    source = _write_wav16(folder / "music16.wav", _music())
    out = {"music16.wav": source}
    for name, args in FORMATS.items():
        _ffmpeg("-i", source, *args, str(folder / name))
        out[name] = str(folder / name)
    # A video with the music as its sound track.
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x64:r=12:d=8", "-i", source, "-c:v", "libx264", "-c:a", "aac",
            "-shortest", str(folder / "clip.mp4"))
    out["clip.mp4"] = str(folder / "clip.mp4")
    return out


def test_every_format_gives_the_same_curves_and_beats(files):
    names = list(files)
    analyses = dict(zip(names, analyze_audios([read_audio(files[n])[0] for n in names])))  # one process
    reference = analyses["music16.wav"]
    assert abs(reference.tempo - BPM) < 3, reference.tempo
    assert len(reference.beats) >= 12
    frames = int(7.5 * FPS)
    for name, found in analyses.items():
        for mode in ("loudness", "onsets"):
            ours, theirs = found.per_frame(mode, frames, FPS), reference.per_frame(mode, frames, FPS)
            gap = np.abs(ours - theirs).max() / theirs.max()
            assert gap < 0.15, (name, mode, gap)
            assert np.corrcoef(ours, theirs)[0, 1] > 0.97, (name, mode)
        assert len(found.beats) == len(reference.beats), name
        assert np.abs(found.beats - reference.beats).max() <= 1.0 / FPS, name  # within one frame
        assert abs(found.tempo - reference.tempo) < 1.0, name


def test_strength_follows_the_music(files):
    """At 12 fps and 120 BPM a kick starts every 6th frame, a hi-hat 3 frames later:
    loudness peaks on the kicks, onset strength on the kicks and hats, near zero between."""
    analysis = analyze_audio(*read_audio(files["music16.wav"]))
    loudness = analysis.per_frame("loudness", 72, FPS).reshape(12, 6).mean(axis=0)  # by frame within a beat
    onsets = analysis.per_frame("onsets", 72, FPS).reshape(12, 6).mean(axis=0)
    assert loudness[0] > 1.5 * loudness[2:5].max()
    assert min(onsets[0], onsets[3]) > 10 * max(onsets[1], onsets[2], onsets[4])
    assert np.allclose(np.diff(analysis.beats), 0.5, atol=0.03)


@pytest.mark.parametrize("case, match", [
    ("video_only", "the file has no audio stream"),
    ("silence", "the audio is silent"),
    ("truncated", "Received: audio="),
    ("text.mp3", "cannot read the audio"),
    ("missing", "the audio file does not exist"),
])
def test_bad_audio_is_one_line(files, tmp_path, case, match):
    path = str(tmp_path / case)
    if case == "video_only":
        path += ".mp4"
        _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x64:r=12:d=1", "-c:v", "libx264", path)
    elif case == "silence":
        path = _write_wav16(path + ".wav", np.zeros((22050, 2), np.float32))
    elif case == "truncated":
        path += ".m4a"
        with open(files["music.m4a"], "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 3])
    elif case == "text.mp3":
        with open(path, "w") as f:
            f.write("ID3? no, just text")
    with pytest.raises(SdanimError, match=match) as error:
        read_audio(path)
    assert "\n" not in str(error.value)


def test_bad_audio_via_cli_is_exit_2_before_any_model(tmp_path, capsys, monkeypatch):
    from sdanim.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    (tmp_path / "song.mp3").write_text("not audio")
    assert main(["morph", "a", "b", "--out", str(tmp_path / "m.mp4"), "--audio", str(tmp_path / "song.mp3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdanim: error: cannot read the audio") and err.count("\n") == 1
    assert not (tmp_path / "m_frames").exists()


def test_keyframe_times_and_beat_positions():
    beats = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    times = audio.keyframe_times(beats, transitions=2, every=3)
    assert list(times) == [0.0, 1.5, 3.0]
    u = audio.beat_positions(times, fps=2.0, easings=["linear", "linear"])
    assert list(u) == [0.0, 1 / 3, 2 / 3, 1.0, 1 + 1 / 3, 1 + 2 / 3, 2.0]  # frame 3 (t = 1.5 s) is keyframe 1
    loop = audio.beat_positions(times, fps=2.0, easings=["linear", "linear"], include_end=False)
    assert len(loop) == 6
    with pytest.raises(SdanimError, match=r"keyframes on every 4 beat\(s\) need 8 beats for 2 transition\(s\); "
                                          r"the audio has 6\. Received: beats_per_keyframe=4"):
        audio.keyframe_times(beats, transitions=2, every=4)


def test_beat_synced_walk_puts_keyframes_on_beats(tiny, files, tmp_path, monkeypatch, capsys):
    from sdanim.frontends.cli import options

    monkeypatch.setattr(options, "model_for", lambda args, settings: tiny)
    walk = tmp_path / "w.yaml"
    walk.write_text("keyframes: [{prompt: a, seed: 1}, {prompt: b, seed: 2}, {prompt: c, seed: 3}]\n")
    out = str(tmp_path / "w.mp4")
    assert main(["walk", str(walk), "--audio", files["music.mp3"], "--audio-mode", "beats", "--beats-per-keyframe", "4",
                 "--fps", "12", "--out", out, "--size", "64x64", "--steps", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "tempo 1" in printed and "BPM" in printed and os.path.exists(str(tmp_path / "w_audio.png"))
    with open(tmp_path / "w_frames" / "manifest.json") as f:
        manifest = json.load(f)
    positions = np.array(manifest["positions"])
    beats = analyze_audio(*read_audio(files["music.mp3"])).beats
    for j, beat in ((1, beats[3]), (2, beats[7])):  # keyframe j on beat 4j
        frame = int(np.argmin(np.abs(np.arange(len(positions)) / 12.0 - beat)))
        assert abs(positions[frame] - j) < 0.2, (j, positions[frame])
    assert positions[-1] == 2.0 and len(positions) == int(np.ceil(beats[7] * 12)) + 1
    assert manifest["timing"]["audio"]["mode"] == "beats" and manifest["timing"]["audio"]["beats_per_keyframe"] == 4


def test_audio_synced_morph_is_muxed_and_plotted(tiny, files, tmp_path):
    result = sdanim.morph(["a red cube", "a blue sphere"], out=str(tmp_path / "m.mp4"), frames=12,
                          export=sdanim.ExportSettings(fps=4, audio=files["music.m4a"], audio_mode="onsets"),
                          settings=S, model=tiny, progress=False)
    streams = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", result.out],
                             capture_output=True, text=True).stderr
    assert "Video: h264" in streams and "Audio: aac" in streams
    assert result.audio_plot == str(tmp_path / "m_audio.png") and os.path.getsize(result.audio_plot) > 1000


def test_limits_hold_on_the_final_plan_before_any_model(tmp_path):
    """Item 2 of issue 33: a shared app's frame limit holds on the frames audio timing
    makes (beats mode: the count comes from the track and fps, not the walk), on the
    in-betweens and on the upscaled size; refused before a model is asked for."""
    from sdanim.config.limits import Limits

    song = _write_wav16(tmp_path / "song.wav", _music(seconds=8.0))
    walk = sdanim.Walk((sdanim.Keyframe("a", 1, frames=2), sdanim.Keyframe("b", 2)))  # 3 frames without audio

    def no_model():
        pytest.fail("a model was asked for")

    beats = sdanim.ExportSettings(fps=30, audio=song, audio_mode="beats", beats_per_keyframe=4)  # about 2 s
    cases = [  # (export, the operator's max_frames, the refusal)
        (beats, 20, r"at most 20 frames per request \(the operator's --max-frames\)\. Received: frames=6[0-9]"),
        (sdanim.ExportSettings(interpolate=8), 16, r"at most 16 frames .*Received: frames=17"),  # 3 rendered + 14
        (sdanim.ExportSettings(upscale=4), 20, r"at most 128 pixels .*--max-size.*Received: pixels=256"),
    ]
    for export, max_frames, match in cases:
        with pytest.raises(SdanimError, match=match):
            sdanim.animate(walk, out=str(tmp_path / "w.mp4"), settings=S, export=export, model=no_model,
                           progress=False, limits=Limits(max_frames=max_frames, max_size=128))
    assert not os.path.exists(tmp_path / "w_frames" / "frame_00000.png")


def _kill_itself():
    return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """sdanim's numba cache in a folder of the test's, with a file of numba's in it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    cache = audio_files.numba_cache_dir()
    os.makedirs(cache)
    with open(os.path.join(cache, "beat.__trim_beats-609.py311.1.nbc"), "wb") as f:
        f.write(b"mixed-up code")
    return cache


def test_the_analysis_runs_in_a_process_of_its_own(monkeypatch):
    """librosa's numba code never runs in the caller's process (numba/numba#10128: two
    processes compiling it at once leave a cache that crashes every later load), and
    the caller's environment is left as it was; numba's code is kept in sdanim's folder."""
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    before, env = "numba" in sys.modules, dict(os.environ)
    found = analyze_audio(_music(4.0, 22050)[:, 0])
    assert ("numba" in sys.modules) == before and dict(os.environ) == env
    assert abs(found.tempo - BPM) < 3 and len(found.beats) >= 6
    assert os.listdir(audio_files.numba_cache_dir())


def _answers(tempo):
    """A stand-in analysis process that answers `tempo` (its samples read and dropped)."""
    code = ("import io, sys, numpy as np; sys.stdin.buffer.read(); b = io.BytesIO(); "
            f"np.savez(b, **{{'0_loudness': np.ones(3), '0_onsets': np.ones(3), '0_beats': np.array([0.5]), "
            f"'0_tempo': {tempo}, '0_duration': 4.0}}); sys.stdout.buffer.write(b.getvalue())")
    return [sys.executable, "-c", code]


def test_a_crashed_analysis_clears_sdanims_numba_cache_and_runs_once_more(own_cache, monkeypatch):
    commands = []

    def crash_once():
        commands.append(len(commands))
        return _kill_itself() if len(commands) == 1 else _answers(97.0)

    monkeypatch.setattr(audio_files, "_analysis_command", crash_once)
    found = analyze_audio(_music(4.0, 22050)[:, 0])
    assert len(commands) == 2 and found.tempo == 97.0 and list(found.beats) == [0.5]
    assert not os.path.exists(os.path.join(own_cache, "beat.__trim_beats-609.py311.1.nbc"))  # compiled afresh


def test_a_user_numba_cache_is_left_alone_and_two_crashes_are_one_line(own_cache, tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "their.nbc").write_bytes(b"theirs")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(theirs))
    monkeypatch.setattr(audio_files, "_analysis_command", _kill_itself)
    with pytest.raises(SdanimError, match=r"crashed twice \(SIGSEGV\).*Received: 4\.0 s of audio") as error:
        analyze_audio(_music(4.0, 22050)[:, 0])
    assert "\n" not in str(error.value)
    assert (theirs / "their.nbc").read_bytes() == b"theirs"
    assert os.path.exists(os.path.join(own_cache, "beat.__trim_beats-609.py311.1.nbc"))  # not sdanim's to clear



def test_an_analysis_that_fails_or_hangs_is_one_line(own_cache, monkeypatch):
    samples = _music(4.0, 22050)[:, 0]
    monkeypatch.setattr(audio_files, "_analysis_command", lambda: [
        sys.executable, "-c", "import sys; sys.stdin.buffer.read(); sys.exit('librosa is not installed')"])
    with pytest.raises(SdanimError, match=r"^the audio analysis \(librosa\) failed: librosa is not installed\. "
                                          r"Received: 4\.0 s of audio$"):
        analyze_audio(samples)
    monkeypatch.setattr(audio_files, "ANALYSIS_TIMEOUT", 1)
    monkeypatch.setattr(audio_files, "_analysis_command", lambda: [sys.executable, "-c", "import time; time.sleep(30)"])
    with pytest.raises(SdanimError, match=r"^the audio analysis \(librosa\) took over 1 s\. Received: 4\.0 s of audio$"):
        analyze_audio(samples)

@pytest.mark.slow
def test_two_processes_analysing_at_once_with_a_cold_cache_both_finish(tmp_path):
    """Two processes (two notebooks, or the app and the CLI) time walks by audio at the
    same moment, on a machine where numba has compiled nothing yet. In one process each,
    librosa's beat tracker crashed 2 times in 6 here (numba/numba#10128); sdanim's
    analyses take turns."""
    samples = _music(6.0, 22050)[:, 0]
    np.save(tmp_path / "samples.npy", samples)
    script = ("import sys, numpy as np; from sdanim.formats.audio import analyze_audio; "
              "a = analyze_audio(np.load(sys.argv[1])); print(a.tempo, len(a.beats))")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("NUMBA_CACHE_DIR", None)
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "samples.npy")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err.decode()[-400:] for _, err in outs]
    assert outs[0][0] == outs[1][0] and outs[0][0].strip()
