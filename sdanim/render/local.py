"""Frame sources: where a job's frames are rendered. Every source implements
`FrameSource`; `LocalFrames` renders in this process, `sdanim.render.ray.RayFrames` on
Ray workers."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Protocol, runtime_checkable

from sdanim.render.jobs import Job, frame_metadata, model_record
from sdanim.render.motion import render_motion
from sdanim.render.sampling import render_frames
from sdanim.render.store import FrameStore


@runtime_checkable
class FrameSource(Protocol):
    """Renders jobs' frames; a context manager that releases what it holds on exit."""

    def describe(self) -> dict:
        """The model's manifest record."""

    def render(self, job: Job, indices: Iterable[int], store: Optional[FrameStore] = None,
               progress: bool = True, on_batch: Optional[Callable] = None) -> dict:
        """Renders frames `indices` of `job` in the batches an uninterrupted run makes;
        with a store, each frame is written to it (with `frame_metadata`) as soon as it
        exists. Returns {index: image} of the frames it returns to the caller."""

    def render_motion(self, job: Job, spec, store: FrameStore, progress: bool = True,
                      on_batch: Optional[Callable] = None) -> dict:
        """Renders a walk's frames with motion modules (`sdanim.MotionSpec`: frames denoised
        together in windows) into `store`; resumes from the clip's saved state. Returns
        {index: image} of the frames written now."""

    def close(self) -> None: ...

    def __enter__(self): ...

    def __exit__(self, *exc): ...


class LocalFrames:
    """Renders jobs with a model in this process (the default frame source)."""

    def __init__(self, model):
        self.model = model
        self._prepared: Optional[tuple] = None  # (job key, plan, renderer)

    def describe(self) -> dict:
        return model_record(self.model)

    def prepare(self, job: Job):
        """(plan, renderer) of `job`, kept for the next call with the same job."""
        if self._prepared is None or self._prepared[0] != job.key:
            self._prepared = (job.key, job.plan(self.model), job.renderer(self.model))
        return self._prepared[1:]

    def render(self, job: Job, indices: Iterable[int], store: Optional[FrameStore] = None,
               progress: bool = True, on_batch: Optional[Callable] = None) -> dict:
        plan, renderer = self.prepare(job)
        record = self.describe() if store is not None else {}

        def save(batch, images):
            if store is not None:
                for index, image in zip(batch, images):
                    store.write(index, image, frame_metadata(job, index, record))
            if on_batch is not None:
                on_batch(batch, images)

        return render_frames(renderer, plan, indices, job.settings.batch_size, on_batch=save, progress=progress)

    def render_motion(self, job: Job, spec, store: FrameStore, progress: bool = True,
                      on_batch: Optional[Callable] = None) -> dict:
        plan, renderer = self.prepare(job)
        return render_motion(self.model, job, spec, store, plan, renderer, progress, on_batch)

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
