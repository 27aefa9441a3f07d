"""Great Expectations: run a suite over a pandas frame, render an HTML report, fail with every broken expectation named.

GX takes seconds to import, so it is imported inside the functions that need it.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExpectationOutcome:
    name: str  # expectation type
    column: str | None
    success: bool
    details: dict = field(default_factory=dict)
    frame: str = ""  # which of the validated frames

    def describe(self) -> str:
        where = f"[{self.frame}] " if self.frame else ""
        col = f" on column '{self.column}'" if self.column else ""
        bits = ", ".join(f"{k}={v}" for k, v in self.details.items() if v not in (None, [], {}))
        return f"{where}{self.name}{col}" + (f" ({bits})" if bits else "")


@dataclass
class ValidationResult:
    suite: str
    success: bool
    results: list[ExpectationOutcome]
    statistics: dict

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success]


class DataValidationError(Exception):
    def __init__(self, result: ValidationResult):
        self.result = result
        lines = "\n".join(f"  - {r.describe()}" for r in result.failed)
        super().__init__(f"data validation failed: {len(result.failed)} of {len(result.results)} expectations of "
                         f"suite '{result.suite}' failed:\n{lines}")


def run_suite(suite_name: str, frames: Any, expectations: dict[str, list] | list) -> ValidationResult:
    """Validate pandas frames with Great Expectations expectations.

    Either one frame and a list of expectations, or several named frames (e.g. per-item stats and per-class
    counts) and a dict giving each frame's list. Any dataset kind reuses this by building its own frames.
    """
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if isinstance(frames, pd.DataFrame):
        frames = {"data": frames}
    if isinstance(expectations, (list, tuple)):
        if len(frames) != 1:
            raise ValueError("a plain list of expectations needs exactly one frame; pass a dict frame name -> list")
        expectations = {next(iter(frames)): list(expectations)}
    unknown = sorted(set(expectations) - set(frames))
    if unknown:
        raise ValueError(f"expectations given for frames {unknown} that were not passed; frames: {sorted(frames)}")

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas(suite_name)
    outcomes: list[ExpectationOutcome] = []
    for frame_name, df in frames.items():
        batch = source.add_dataframe_asset(frame_name).add_batch_definition_whole_dataframe(frame_name).get_batch(
            batch_parameters={"dataframe": df})
        suite = gx.ExpectationSuite(f"{suite_name}.{frame_name}")
        for e in expectations.get(frame_name, []):
            suite.add_expectation(e)
        for r in batch.validate(suite).results:
            res = r.result or {}
            details = {"unexpected": res.get("unexpected_count"),
                       "examples": _clean(res.get("partial_unexpected_list", [])[:5]),
                       "observed": _clean(res.get("observed_value"))}
            if r.exception_info and r.exception_info.get("raised_exception"):
                details["error"] = r.exception_info.get("exception_message")
            kw = r.expectation_config.kwargs
            for bound in ("min_value", "max_value", "value_set", "value"):
                if bound in kw:
                    details[bound] = _clean(kw[bound])
            column = kw.get("column") or "/".join(kw[c] for c in ("column_A", "column_B") if c in kw) or None
            outcomes.append(ExpectationOutcome(r.expectation_config.type, column, bool(r.success), details,
                                               frame_name))
    stats = {"expectations": len(outcomes), "failed": sum(not o.success for o in outcomes),
             **{f"rows_{k}": len(v) for k, v in frames.items()}}
    return ValidationResult(suite_name, stats["failed"] == 0, outcomes, stats)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, (list, tuple, set)):
        return [_clean(x) for x in v]
    return v.item() if hasattr(v, "item") else v


def render_html(result: ValidationResult, title: str) -> str:
    rows = "\n".join(
        f"<tr class='{'ok' if r.success else 'bad'}'><td>{'pass' if r.success else 'FAIL'}</td>"
        f"<td>{html.escape(r.frame)}</td><td>{html.escape(r.name)}</td><td>{html.escape(r.column or '')}</td>"
        f"<td>{html.escape(', '.join(f'{k}={v}' for k, v in r.details.items() if v not in (None, [], {})))}</td></tr>"
        for r in result.results)
    verdict = "passed" if result.success else f"FAILED ({len(result.failed)} of {len(result.results)} expectations)"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
tr.bad{{background:#fdd}}tr.ok{{background:#efe}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Suite <code>{html.escape(result.suite)}</code>: <b>{verdict}</b></p>
<p>{html.escape(', '.join(f'{k}: {v}' for k, v in result.statistics.items()))}</p>
<table><tr><th>result</th><th>frame</th><th>expectation</th><th>column</th><th>details</th></tr>
{rows}</table></body></html>"""


def write_report(result: ValidationResult, path: Path, title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result, title))
    return path


def require_valid(result: ValidationResult) -> ValidationResult:
    """Raise DataValidationError (naming every failed expectation) unless the result passed."""
    if not result.success:
        raise DataValidationError(result)
    return result


def validate_image_caption_dataset(dataset_dir: Path, report_html: Path, *,
                                   balance_tolerance: float = 0.5) -> ValidationResult:
    """The image+caption suite (defined with the dataset format in distillery.data.expectations)."""
    from distillery.data.expectations import validate_image_caption_dataset as validate

    return validate(dataset_dir, report_html, balance_tolerance=balance_tolerance)
