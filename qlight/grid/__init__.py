"""``qlight grid``: a paper table's runs (configs × seeds × overrides) with fixed names.

They are trained K at a time on one machine (or written as SLURM array scripts) and survive being killed
and run again.

:mod:`~qlight.grid.protocol` loads protocols and expands them into :class:`~qlight.grid.protocol.RunSpec`;
:mod:`~qlight.grid.check` resolves each run's config up front; :mod:`~qlight.grid.launch` plans (skip, resume,
start) and runs them; :mod:`~qlight.grid.slurm` writes the array scripts; :mod:`~qlight.grid.main` is the command.
"""

from qlight.grid.protocol import GridError, RunSpec, expand, load_protocol

__all__ = ["GridError", "RunSpec", "expand", "load_protocol"]
