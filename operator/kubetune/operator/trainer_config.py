"""FineTuneJob spec -> trainer config (schemaVersion 1), the only contract operator -> trainer.

The operator renders it into the ConfigMap ``<job>-trainer-config`` (key ``config.yaml``);
every worker reads it from ``/etc/kubetune/config.yaml``. S3 credentials never appear here:
they reach the trainer as env vars from the job's Secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.spec import FineTuneJobSpec

SCHEMA_VERSION = 1
CONFIG_KEY = "config.yaml"
CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"


@dataclass(frozen=True)
class JobRef:
    """Identity of a FineTuneJob object, enough to name and own its children."""

    name: str
    namespace: str
    uid: str
    generation: int = 1


def build_trainer_config(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer config as a dict; keys and order follow the documented schema."""
    return {
        "schemaVersion": SCHEMA_VERSION,
        "job": {"namespace": job.namespace, "name": job.name, "uid": job.uid},
        "model": spec.model.model_dump(by_alias=True),
        "dataset": _without_defaults(spec.dataset.model_dump(by_alias=True), keep=("uri",)),
        "lora": {**spec.lora.model_dump(by_alias=True), "targetModules": list(spec.lora.target_modules)},
        "training": _without_defaults(spec.training.model_dump(by_alias=True), keep=()),
        "deepspeed": _without_defaults(spec.deepspeed.model_dump(by_alias=True), keep=()),
        "output": _without_defaults(spec.output.model_dump(by_alias=True), keep=("adapterUri",)),
        **({"qualityGate": {"maxEvalLoss": spec.quality_gate.max_eval_loss}}
           if spec.quality_gate.max_eval_loss is not None else {}),
        "storage": {
            "endpoint": spec.storage.endpoint or settings.s3_endpoint,
            "region": spec.storage.region,
        },
        "metrics": {"port": settings.trainer_metrics_port},
    }


def _without_defaults(section: dict[str, Any], *, keep: tuple[str, ...]) -> dict[str, Any]:
    """Fields added to schema 1 after its first release are rendered only when set, so a job
    that does not use them still runs on an older schema-1 trainer (which rejects unknown keys)."""
    defaults = {"checkpointUri": None, "checkpointEverySteps": 0, "keepCheckpoints": 2,
                "validationUri": None, "overlong": "truncate", "packing": False,
                "warmupSteps": None, "minLearningRate": 0.0, "gradientCheckpointing": False,
                "gradientClipping": 1.0, "config": None}
    return {k: v for k, v in section.items() if k in keep or k not in defaults or v != defaults[k]}


def render_trainer_config(job: JobRef, spec: FineTuneJobSpec, settings: OperatorSettings) -> str:
    """YAML text for the ConfigMap (keys kept in schema order so diffs read naturally)."""
    return yaml.safe_dump(build_trainer_config(job, spec, settings), sort_keys=False)
