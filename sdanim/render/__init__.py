"""The render floor: frame plans through the sampler in batches (`sampling`), jobs and
their frame sources in this process (`local`) or on Ray workers (`ray`), the frames
on disk (`store`), the run set-up (`run`) and export to video (`export`)."""
