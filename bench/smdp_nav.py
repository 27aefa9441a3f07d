"""smdp-nav targets from one pipeline run (issue: adaptive execution duration with SMDP advantages), ours vs the
baseline each target names, side by side:

- adaptive (SMDP) success vs the best fixed duration's (target: +5 points; the paper reports +10.3), with 95% CIs
  over the evaluation episodes;
- SMDP advantage vs naive per-decision discounting (target: +5 points);
- adaptive decisions per episode vs the shortest fixed duration's (target: <= 0.5x);
- the spread among the fixed durations (target: >= 15 points: the fragility the paper starts from);
- ir-sim success vs the training world's (target: >= 0.8x).

    python bench/smdp_nav.py --run --profile cpu [--set sim_budget_s=60000]   # run the pipeline, then report
    python bench/smdp_nav.py --home DIR                                      # report a finished run again
"""

from __future__ import annotations

from _common import pipeline_evaluation, report

POLICIES = ("adaptive_smdp", "adaptive_naive", "fixed_0p1s", "fixed_0p3s", "fixed_0p8s")


def main() -> None:
    m, extra = pipeline_evaluation("smdp-nav", __doc__)
    fixed = [p for p in POLICIES if p.startswith("fixed")]
    best = max(fixed, key=lambda p: m[f"{p}_success_rate"])
    low = min(fixed, key=lambda p: m[f"{p}_success_rate"])
    a = "adaptive_smdp"
    rows = [
        (f"success: adaptive SMDP vs best fixed ({best})", m[f"{a}_success_rate"], m[f"{best}_success_rate"], ""),
        ("success: adaptive SMDP vs adaptive naive", m[f"{a}_success_rate"], m["adaptive_naive_success_rate"], ""),
        ("decisions / episode: adaptive vs fixed 0.1 s", m[f"{a}_decisions_per_episode"],
         m["fixed_0p1s_decisions_per_episode"], ""),
        (f"success: best fixed ({best}) vs worst fixed ({low})", m[f"{best}_success_rate"], m[f"{low}_success_rate"], ""),
    ]
    if f"{a}_irsim_success_rate" in m:
        rows.append(("success: ir-sim vs training world (adaptive SMDP)", m[f"{a}_irsim_success_rate"],
                     m[f"{a}_success_rate"], ""))
    for p in POLICIES:
        for level in ("sparse", "medium", "crowded"):
            extra[f"{p}_{level}_success_rate"] = m.get(f"{p}_{level}_success_rate")
        extra[f"{p}_success_rate_ci"] = m.get(f"{p}_success_rate_ci")
    targets = {
        "adaptive >= best fixed + 0.05": m[f"{a}_success_rate"] - m[f"{best}_success_rate"] >= 0.05,
        "SMDP >= naive + 0.05": m["success_vs_naive"] >= 0.05,
        "adaptive decisions <= 0.5x fixed 0.1 s": m["decisions_ratio_vs_shortest_fixed"] <= 0.5,
        "fixed durations differ by >= 0.15": m["fixed_success_spread"] >= 0.15,
    }
    if "irsim_success_ratio" in m:
        targets["ir-sim success >= 0.8x training world's"] = m["irsim_success_ratio"] >= 0.8
    extra.update(targets=targets, metrics={k: v for k, v in m.items() if k.startswith(POLICIES)})
    report("smdp_nav", rows, extra)
    for name, met in targets.items():
        print(f"{'met   ' if met else 'MISSED'}  {name}")


if __name__ == "__main__":
    main()
