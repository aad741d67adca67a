"""Train large, then compress (Li, Wallace et al. 2020) as one command: stages, budgets, and a Pareto report.

``lightning-efficient pipeline -c configs/pipelines/<name>.yaml`` runs a list of stages, each an
ordinary ``lightning-efficient`` run in ``runs/<pipeline>/<stage>/`` (so every strategy and technique
works inside a stage as it does alone), starting each from the stage it names in ``from:``,
measuring each trained model as it would be deployed (pruned heads removed, int8 weights), and
writing ``runs/<pipeline>/report.{json,md}`` with plots of the pretraining curves and the Pareto fronts.

The parts, one module each:

- :mod:`~lightning_efficient.pipeline.spec`: the pipeline file, checked (stages, ``from:``, sweeps, budgets);
- :mod:`~lightning_efficient.pipeline.stages`: each branch's composed config, commands and stage kinds;
- :mod:`~lightning_efficient.pipeline.budget`: :class:`~lightning_efficient.FlopBudget` (exported at the top
  level), which stops a fit at a count of model FLOPs;
- :mod:`~lightning_efficient.pipeline.measure`: parameters, disk size, CPU latency and accuracy of a final model;
- :mod:`~lightning_efficient.pipeline.report`: the Pareto fronts, ``report.md`` and the PNGs;
- :mod:`~lightning_efficient.pipeline.command`: the ``pipeline`` subcommand (resumable; ``--dry_run``, ``--print_commands``, ``--stage``).
"""

from lightning_efficient.pipeline.command import run_pipeline
from lightning_efficient.pipeline.spec import Budget, PipelineSpec, StageSpec, load_pipeline
from lightning_efficient.pipeline.stages import STAGE_KINDS, StageKind, StagePlan, plan_stages, register_stage_kind

__all__ = [
    "STAGE_KINDS",
    "Budget",
    "PipelineSpec",
    "StageKind",
    "StagePlan",
    "StageSpec",
    "load_pipeline",
    "plan_stages",
    "register_stage_kind",
    "run_pipeline",
]
