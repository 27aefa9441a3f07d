"""The SMDP advantage and the naive ablation (equations in the package docstring), on top of `rl.ppo.gae`."""

from __future__ import annotations

import numpy as np

from distillery.rl.ppo import gae


def smdp_advantages(rewards_disc, durations, values, next_values, dones, gamma: float, lam: float):
    """rewards_disc: R_t = sum_j gamma^(j Delta) r_{t,j}; durations: realized tau_t in seconds; gamma per second.
    Arrays (T, N). Returns (advantages, returns)."""
    durations = np.asarray(durations, np.float64)
    if (durations <= 0).any():
        raise ValueError("every realized duration must be > 0 seconds")
    return gae(rewards_disc, values, next_values, dones, np.power(gamma, durations), lam)


def naive_advantages(rewards_sum, tick: float, values, next_values, dones, gamma: float, lam: float):
    """rewards_sum: R_t = sum_j r_{t,j} (undiscounted); one discount gamma^tick per decision, durations ignored."""
    rewards_sum = np.asarray(rewards_sum, np.float64)
    return gae(rewards_sum, values, next_values, dones, np.full(rewards_sum.shape, gamma ** tick), lam)
