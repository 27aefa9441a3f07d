"""Teacher motion priors for robust locomotion (arXiv 2504.10390): a privileged teacher trained by RL, a student on
noisy proprioception trained with an adversarial teacher-motion prior and an auxiliary task.

The paper's exact losses are not public; this is the standard adversarial-motion-prior (AMP) form.

Task reward, the same for the teacher and every student (`env.task_reward`), per control step:

    r_task = 0.5 1[alive] + exp(-(vx - v_cmd)^2 / 0.25) + 0.5 min(vx, v_cmd) / v_cmd - 1e-3 |a|^2

vx the torso's forward velocity, v_cmd the episode's command (0.5-1.5 m/s), a the action: a velocity-tracking kernel
(sigma = 0.25 (m/s)^2, half the command range squared), forward progress paid up to the command, and a small alive
bonus, so walking at the command (2.0 per step) pays 3.5x standing still (0.57 averaged over the commands).

Teacher: PPO (`rl.ppo`) on o_T = (proprio, last action, command, privileged), reward r_task.

Student policy pi(a | o_S), o_S = the last H frames (noisy proprio p~, last action, command): no privileged input.
Discriminator D(s, s') on proprioceptive transitions only, s = p~_t, s' = p~_{t+1} (14 + 14 features), teacher = real
(its rollouts, `rollouts`), student = fake (the current rollout), least squares with a gradient penalty on the
teacher samples:

    L_D = E_T[(D(s, s') - 1)^2] + E_S[(D(s, s') + 1)^2] + w_gp E_T[ |grad_(s,s') D(s, s')|^2 ]

Style reward and the student's reward, per transition:

    r_s = max(0, 1 - 1/4 (D(s, s') - 1)^2)
    r   = w_task r_task + w_style r_s

Auxiliary head h on the actor's last hidden layer phi(o_S), predicting the standardized privileged quantities
y = (vx, vz, torso height, foot contacts, friction / mass / motor scales):

    L = L_PPO(r) + c_aux || h(phi(o_S)) - (y - mu_y) / sigma_y ||^2   (mean over the batch and the 8 targets)

with L_PPO the clipped surrogate + value + entropy terms of `rl.ppo.ppo_update` and mu_y, sigma_y from the teacher's
rollouts. The deployed student is pi's mean alone (observation history -> action): no encoder, no head, no D.
Ablations: without the auxiliary head (c_aux = 0), without the discriminator (r = r_task), DAgger from the teacher,
PPO from scratch on o_S.
"""

from distillery.papers.teacher_prior.env import TerrainConfig, TerrainVecEnv
from distillery.papers.teacher_prior.model import Discriminator, LocoPolicy, discriminator_loss, style_reward
from distillery.papers.teacher_prior.train import IMITATION, VARIANTS, PriorConfig, train_dagger, train_ppo

__all__ = ["IMITATION", "Discriminator", "LocoPolicy", "PriorConfig", "TerrainConfig", "TerrainVecEnv", "VARIANTS",
           "discriminator_loss", "style_reward", "train_dagger", "train_ppo"]
