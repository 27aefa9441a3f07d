"""Reinforcement learning shared by the RL pipelines: a compact PPO core (CleanRL's layout) on Lightning Fabric."""

from distillery.rl.ppo import ActorCritic, PPOConfig, gae, ppo_update

__all__ = ["ActorCritic", "PPOConfig", "gae", "ppo_update"]
