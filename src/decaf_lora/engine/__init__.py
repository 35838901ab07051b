"""Engines run the round loop. ``simulation``: all agents in one process around one shared base model."""

from .simulation import RunResult, Simulation, run

__all__ = ["RunResult", "Simulation", "run"]
