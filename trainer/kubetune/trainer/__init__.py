"""kubetune trainer: the program every FineTuneJob worker pod runs.

Entry point: ``torchrun ... -m kubetune.trainer --config /etc/kubetune/config.yaml``.
The recipe lives in :mod:`kubetune.trainer.train`; the config schema (the only contract
with the operator) in :mod:`kubetune.trainer.config`.
"""

from kubetune.trainer.errors import TrainerError

__all__ = ["TrainerError"]
