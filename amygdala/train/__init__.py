"""Online training beside the server: objectives on token IDs, APOLLO, state, checkpoint sync.

- :mod:`amygdala.train.inputs`: the request (samples of token IDs + job config), checked per field.
- :mod:`amygdala.train.objectives`: SFT, ORPO and DPO losses on continuation tokens.
- :mod:`amygdala.train.apollo`: the APOLLO / APOLLO-Mini optimizer (``DEFAULT_RANK``).
- :mod:`amygdala.train.views`: a transformers model whose parameters are views of served weights.
- :mod:`amygdala.train.layout`: served (vLLM, merged) names <-> checkpoint names.
- :mod:`amygdala.train.checkpoint`: crash-safe block-level sync into the model folder.
- :mod:`amygdala.train.state`: optimizer state saved next to the model.
- :mod:`amygdala.train.trainer`: :class:`Trainer`, what a training worker holds.

Design and usage: docs/training.md.
"""

from amygdala.train.apollo import DEFAULT_RANK, Apollo, OptimizerSettings, build_optimizer
from amygdala.train.inputs import JobConfig, Limits, Sample, TrainInputError, parse_request
from amygdala.train.trainer import JobResult, Trainer, TrainJobError, run_job

__all__ = [
    "DEFAULT_RANK", "Apollo", "OptimizerSettings", "build_optimizer",
    "JobConfig", "Limits", "Sample", "TrainInputError", "parse_request",
    "JobResult", "Trainer", "TrainJobError", "run_job",
]
