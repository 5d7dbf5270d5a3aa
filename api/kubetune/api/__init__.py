"""kubetune's API: the types the operator, the trainer and the CLI agree on.

- ``spec`` / ``status``: FineTuneJob, with defaults, bounds, descriptions and cross-field rules;
  the CRD in ``crds/`` is generated from them (``crd``, ``make crds``);
- ``trainer_config``: the job as the trainer sees it (what the operator renders into every pod);
- ``termination``: how a worker reports how it ended; ``metrics``: the series rank 0 serves;
- ``resource``: the group, version and names, and the rules on a job's name.
- ``labels``: the labels on the pods the operator creates, which tools and monitors select on;
- ``logs``: where each worker's whole log is kept in S3.

Pure: it imports neither kopf, torch nor a Kubernetes client, so every side can depend on it.
"""

from kubetune.api.model import InvalidObjectError, Rule
from kubetune.api.resource import API_VERSION, GROUP, KIND, PLURAL, VERSION, check_job_name
from kubetune.api.spec import FineTuneJobSpec, parse_spec
from kubetune.api.status import CONDITION_TYPES, FINAL_PHASES, PHASES, FineTuneJobStatus, Phase
from kubetune.api.termination import TerminationMessage
from kubetune.api.trainer_config import JobRef, TrainerConfig, load_config, parse_config

__all__ = [
    "API_VERSION", "CONDITION_TYPES", "FINAL_PHASES", "GROUP", "KIND", "PHASES", "PLURAL", "VERSION",
    "FineTuneJobSpec", "FineTuneJobStatus", "InvalidObjectError", "JobRef", "Phase", "Rule",
    "TerminationMessage", "TrainerConfig", "check_job_name", "load_config", "parse_config", "parse_spec",
]
