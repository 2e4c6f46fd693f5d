"""Online training beside the server: objectives on token IDs, APOLLO, state, checkpoint sync.

- :mod:`amygdala.finetune.inputs`: the request (samples of token IDs + job config), checked per field.
- :mod:`amygdala.finetune.objectives`: SFT, ORPO and DPO losses on continuation tokens.
- :mod:`amygdala.finetune.apollo`: the APOLLO / APOLLO-Mini optimizer (``DEFAULT_RANK``).
- :mod:`amygdala.finetune.shared_weights`: a transformers model whose parameters are views of served weights.
- :mod:`amygdala.checkpoint.layout`: served (vLLM, merged) names <-> checkpoint names.
- :mod:`amygdala.checkpoint`: crash-safe block-level sync into the model folder.
- :mod:`amygdala.finetune.state`: optimizer state saved next to the model.
- :mod:`amygdala.finetune.trainer`: :class:`Trainer`, what a training worker holds.

Design and usage: docs/finetuning.md.
"""

from amygdala.finetune.apollo import DEFAULT_RANK, Apollo, OptimizerSettings, build_optimizer
from amygdala.finetune.inputs import JobConfig, Limits, Sample, parse_request
from amygdala.fields import FieldError
from amygdala.finetune.trainer import JobResult, Trainer, TrainJobError, run_job

__all__ = [
    "DEFAULT_RANK", "Apollo", "OptimizerSettings", "build_optimizer",
    "JobConfig", "Limits", "Sample", "FieldError", "parse_request",
    "JobResult", "Trainer", "TrainJobError", "run_job",
]
