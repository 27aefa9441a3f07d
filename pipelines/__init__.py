"""One file per paper DAG. `PIPELINES` maps the name users type to the pipeline function."""

from __future__ import annotations

from typing import Callable


def registry() -> dict[str, Callable]:
    from pipelines.hybrid_sd import hybrid_sd
    from pipelines.mode import mode
    from pipelines.scott import scott
    from pipelines.smdp_nav import smdp_nav
    from pipelines.swift_diffusion import swift_diffusion
    from pipelines.teacher_prior import teacher_prior
    from pipelines.tiny_sd import tiny_sd

    return {"tiny-sd": tiny_sd, "scott": scott, "mode": mode, "hybrid-sd": hybrid_sd, "smdp-nav": smdp_nav,
            "teacher-prior": teacher_prior, "swift-diffusion": swift_diffusion}
