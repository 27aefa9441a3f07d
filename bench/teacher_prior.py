"""teacher-prior targets from one pipeline run (issue: privileged teacher, student with an adversarial motion prior
and auxiliary tasks), ours vs the baseline each target names, side by side:

- the method student's return under the training noise vs the teacher's with privileged observations (>= 0.85x);
- the method vs the DAgger student on held-out terrain: return >= 1.15x, or fall rate <= 0.7x; and the same
  comparisons with plain behaviour cloning (the teacher always acts), whose distribution shift the prior addresses;
- environment steps to 80% of the final training return, method vs the no-auxiliary ablation (<= 0.7x), each to
  its own final return (the target's reading) and both to the no-auxiliary student's (one bar: which is sooner);
- the auxiliary head's R^2 on held-out states (>= 0.7);
- every student and ablation with its 95% CI over the evaluation episodes, at each noise level and under the wider
  randomization.

    python bench/teacher_prior.py --run --profile cpu [--set student_steps=300000]   # run the pipeline, then report
    python bench/teacher_prior.py --home DIR                                         # report a finished run again
"""

from __future__ import annotations

from _common import pipeline_evaluation, report

STUDENTS = ("method", "no_aux", "no_disc", "dagger", "bc", "scratch")


def main() -> None:
    m, extra = pipeline_evaluation("teacher-prior", __doc__)
    noise = next(k.split("_")[1] for k in m if k.startswith("teacher_noise") and k.endswith("_return"))
    rows = [
        (f"return: method ({noise}) vs teacher (privileged)", m[f"method_{noise}_return"],
         m[f"teacher_{noise}_return"], ""),
        (f"return: method vs DAgger ({noise})", m[f"method_{noise}_return"], m[f"dagger_{noise}_return"], ""),
        (f"fall rate: method vs DAgger ({noise})", m[f"method_{noise}_fall_rate"], m[f"dagger_{noise}_fall_rate"], ""),
        ("return: method vs DAgger (wider randomization)", m["method_wide_return"], m["dagger_wide_return"], ""),
        ("env steps to 80% of final return: method vs no-aux", m.get("method_steps_to_80pct", float("nan")),
         m.get("no_aux_steps_to_80pct", float("nan")), "steps"),
        ("env steps to 80% of the no-aux final return (one bar for both): method vs no-aux",
         m.get("method_steps_to_no_aux_80pct", float("nan")), m.get("no_aux_steps_to_80pct", float("nan")), "steps"),
    ]
    if f"bc_{noise}_return" in m:  # runs before the behaviour-cloning student have none
        rows += [
            (f"return: method vs plain BC ({noise})", m[f"method_{noise}_return"], m[f"bc_{noise}_return"], ""),
            (f"fall rate: method vs plain BC ({noise})", m[f"method_{noise}_fall_rate"], m[f"bc_{noise}_fall_rate"],
             ""),
            ("return: method vs plain BC (wider randomization)", m["method_wide_return"], m["bc_wide_return"], ""),
        ]
    for s in (s for s in STUDENTS[1:] if f"{s}_{noise}_return" in m):
        rows.append((f"return: {s} vs method ({noise})", m[f"{s}_{noise}_return"], m[f"method_{noise}_return"], ""))
    table = {k: v for k, v in m.items() if k.startswith(("teacher_", *(f"{s}_" for s in STUDENTS)))
             and k.rsplit("_", 1)[-1] in ("return", "ci", "rate", "distance", "error", "r2")}
    def beats(student: str) -> bool:
        """The issue's imitation target against one student: return >= 1.15x, or fall rate <= 0.7x."""
        falls = m[f"{student}_{noise}_fall_rate"]
        return (m[f"return_ratio_vs_{student}"] >= 1.15
                or (falls > 0 and m[f"method_{noise}_fall_rate"] <= 0.7 * falls))

    targets = {
        "method >= 0.85x teacher's return": m["return_ratio_vs_teacher"] >= 0.85,
        "method >= 1.15x DAgger's return or <= 0.7x its fall rate": beats("dagger"),
        "steps to 80%: method <= 0.7x no-aux": m.get("steps_to_80pct_ratio_vs_no_aux", float("inf")) <= 0.7,
        "auxiliary R^2 >= 0.7": m.get("aux_r2", float("-inf")) >= 0.7,
    }
    if "return_ratio_vs_bc" in m:
        targets["method >= 1.15x plain BC's return or <= 0.7x its fall rate"] = beats("bc")
    extra.update(targets=targets, metrics=table, aux_r2=m.get("aux_r2"))
    report("teacher_prior", rows, extra)
    for name, met in targets.items():
        print(f"{'met   ' if met else 'MISSED'}  {name}")


if __name__ == "__main__":
    main()
