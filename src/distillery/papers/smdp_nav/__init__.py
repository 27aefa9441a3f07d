"""SMDP navigation: a differential-drive robot that chooses how long each action lasts (arXiv 2108.06161).

The action is (v, w, tau): linear and angular velocity held for tau seconds, tau in a bounded range. A decision
therefore lasts a variable time and navigation is a semi-Markov decision process. The simulator ticks every
Delta seconds; decision t runs k_t ticks, fewer than tau_t / Delta when a collision or the arrival cuts it short,
so its realized duration is tau_t = k_t Delta. With gamma the discount per SECOND, the SMDP advantage is

    R_t     = sum_{j < k_t} gamma^(j Delta) r_{t,j}                       (the decision's discounted reward)
    delta_t = R_t + gamma^(tau_t) (1 - d_t) V(s_{t+1}) - V(s_t)
    A_t     = delta_t + (gamma^(tau_t) lambda) (1 - d_t) A_{t+1}

(`advantage.smdp_advantages`). The naive ablation (`advantage.naive_advantages`) discounts per decision with the
one-tick factor gamma^Delta whatever the decision lasted, and sums its rewards undiscounted: R_t = sum_j r_{t,j},
delta_t = R_t + gamma^Delta (1 - d_t) V(s_{t+1}) - V(s_t), A_t = delta_t + gamma^Delta lambda (1 - d_t) A_{t+1}.
When every decision is one tick both are the same estimator. Fixed-duration policies are the same PPO with tau
fixed (the action is (v, w)); their decisions all last tau, so SMDP and naive differ only by a constant discount.

The reward is charged per tick: terminal +/- on arrival / collision, progress towards the goal, and a time penalty
per simulated second (charged per decision it would favour long durations for the wrong reason).
"""

from distillery.papers.smdp_nav.advantage import naive_advantages, smdp_advantages
from distillery.papers.smdp_nav.env import NavConfig, NavVecEnv

__all__ = ["NavConfig", "NavVecEnv", "naive_advantages", "smdp_advantages"]
