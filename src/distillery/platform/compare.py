"""Runs of one pipeline side by side, from MLflow: used by `distillery compare` and the notebook."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def runs_frame(pipeline: str, *, metrics: list[str] | None = None, last: int = 10) -> pd.DataFrame:
    """Parent runs of `pipeline` (newest first) with the metrics of their steps, one row per run."""
    import mlflow

    from distillery.platform import tracking

    exp = tracking.experiment_for(pipeline)
    runs = mlflow.search_runs(experiment_ids=[exp], output_format="pandas", order_by=["start_time DESC"])
    if runs.empty:
        return pd.DataFrame()
    parent_col = "tags.mlflow.parentRunId"
    is_parent = runs[parent_col].isna() if parent_col in runs else pd.Series(True, index=runs.index)
    parents = runs[is_parent].head(last)
    rows = []
    for _, p in parents.iterrows():
        children = runs[runs.get(parent_col) == p["run_id"]] if parent_col in runs else runs.iloc[0:0]
        row = {"run_id": p["run_id"][:8], "profile": p.get("tags.profile"), "status": p["status"]}
        for _, c in children.iterrows():
            for col in c.index:
                if col.startswith("metrics.") and pd.notna(c[col]):
                    row[col.removeprefix("metrics.")] = float(c[col])
        rows.append(row)
    frame = pd.DataFrame(rows)
    if metrics:
        missing = [m for m in metrics if m not in frame.columns]
        if missing:
            raise ValueError(f"metric(s) {missing} not logged by any {pipeline} run; "
                             f"available: {sorted(c for c in frame.columns if c not in ('run_id', 'profile', 'status'))}")
        frame = frame[["run_id", "profile", "status", *metrics]]
    return frame


def plot(frame: pd.DataFrame, path: Path) -> Path:
    """One bar chart per metric, runs on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_cols = [c for c in frame.columns if c not in ("run_id", "profile", "status")]
    n = max(1, len(metric_cols))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, col in zip(axes[0], metric_cols):
        ax.bar(frame["run_id"], frame[col].astype(float))
        ax.set_title(col)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
