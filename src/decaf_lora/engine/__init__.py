"""Engines run the round loop. ``simulation``: all agents in one process around one shared base model."""

from .simulation import RunResult, Simulation, resume, run

__all__ = ["RunResult", "Simulation", "resume", "run"]
