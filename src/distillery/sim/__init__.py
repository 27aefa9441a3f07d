"""Simulators behind small modules: environments, tasks and scripted experts."""
