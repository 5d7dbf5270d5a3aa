"""kubetune trainer: the program every FineTuneJob worker pod runs.

Entry point: ``torchrun ... -m kubetune.trainer --config /etc/kubetune/config.json``.
The recipe lives in :mod:`kubetune.trainer.train`; its input, the trainer config (the only
contract with the operator), is :mod:`kubetune.api.trainer_config`.
"""

from kubetune.trainer.errors import TrainerError

__all__ = ["TrainerError"]
