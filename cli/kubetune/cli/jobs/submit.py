"""`kubectl kubetune submit`: create a FineTuneJob from a manifest, from flags, or both.

    kubectl kubetune submit -f job.yaml
    kubectl kubetune submit support-bot --model s3://models/llama/ --dataset s3://data/train.jsonl \\
        --format chat --workers 2 --output s3://adapters/support-bot/ --credentials-secret s3-creds
    kubectl kubetune submit support-bot -f examples/quickstart.yaml --max-steps 20 --dry-run -o yaml

Flags given with -f override the manifest's fields. Before anything is sent, the job is checked
with kubetune's own API types (``kubetune.api.parse_spec``: the same fields, bounds and cross-field
rules the API server enforces), and an error names the field, the flag that sets it and the fix.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.api import API_VERSION, KIND, InvalidObjectError, check_job_name, parse_spec
from kubetune.api.spec import S3_URI_PATTERN
from kubetune.cli.jobs.common import describe_command, CommandError, Kubectl, add_cluster_flags, handles_errors, prog

HELP = "create a FineTuneJob from a manifest (-f) or from flags; --dry-run -o yaml prints it"


@dataclass(frozen=True)
class Flag:
    option: str
    path: str  # under spec, camelCase as in the manifest
    type: Any = str
    help: str = ""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def _modules(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


FLAGS = (
    Flag("--model", "model.uri", help="s3:// folder of the base model (config.json, tokenizer, weights)",
         metavar="S3_URI"),
    Flag("--dataset", "dataset.uri", help="s3:// JSONL or Parquet file of training examples", metavar="S3_URI"),
    Flag("--format", "dataset.format", help="how an example is read: text | instruction | chat (default text)"),
    Flag("--validation-split", "dataset.validationSplit", float, "fraction held out for the eval loss (0-0.5)"),
    Flag("--validation-data", "dataset.validationUri", help="s3:// file of evaluation examples", metavar="S3_URI"),
    Flag("--workers", "workers.replicas", int, "worker pods (torchrun nodes)", "N"),
    Flag("--gpus-per-worker", "workers.gpusPerWorker", int, "GPUs per worker pod; 0 = one CPU process", "N"),
    Flag("--image", "workers.image", help="trainer image (default: the operator's)"),
    Flag("--output", "output.adapterUri", help="s3:// folder where the adapter is published", metavar="S3_URI"),
    Flag("--checkpoint-uri", "output.checkpointUri", help="s3:// folder for checkpoints (resume after a restart)",
         metavar="S3_URI"),
    Flag("--epochs", "training.epochs", int, "passes over the data", "N"),
    Flag("--max-steps", "training.maxSteps", int, "cap on optimizer steps", "N"),
    Flag("--learning-rate", "training.learningRate", float, "peak AdamW learning rate", "LR"),
    Flag("--micro-batch-size", "training.microBatchSize", int, "examples per process per forward pass", "N"),
    Flag("--global-batch-size", "training.globalBatchSize", int,
         "examples per optimizer step (a multiple of micro-batch-size x processes)", "N"),
    Flag("--sequence-length", "training.sequenceLength", int, "longest example in tokens", "N"),
    Flag("--lora-r", "lora.r", int, "LoRA rank", "R"),
    Flag("--lora-alpha", "lora.alpha", int, "LoRA scale (effective alpha/r)", "ALPHA"),
    Flag("--lora-target-modules", "lora.targetModules", _modules, "comma-separated, e.g. q_proj,v_proj", "LIST"),
    Flag("--zero-stage", "deepspeed.zeroStage", int, "DeepSpeed ZeRO stage: 1 | 2 | 3", "STAGE"),
    Flag("--credentials-secret", "storage.credentialsSecret",
         help="Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", metavar="SECRET"),
    Flag("--s3-endpoint", "storage.endpoint", help="S3-compatible endpoint the workers use (default: the operator's)",
         metavar="URL"),
    Flag("--queue", "scheduling.queueName", help="Kueue LocalQueue for the worker pods"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe_command(parser, __doc__)
    parser.add_argument("name", nargs="?", help="the job's name (metadata.name); with -f, overrides the manifest's")
    parser.add_argument("-f", "--filename", metavar="MANIFEST",
                        help="a FineTuneJob manifest (YAML or JSON; - for stdin); flags override its fields")
    job = parser.add_argument_group("the job (each flag sets the spec field in brackets)")
    for flag in FLAGS:
        job.add_argument(flag.option, dest=flag.dest, type=flag.type, metavar=flag.metavar,
                         help=f"{flag.help} [spec.{flag.path}]")
    job.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="any other spec field by its path, e.g. --set training.packing=true "
                          "(the value is read as JSON, else YAML, else text; repeatable)")
    parser.add_argument("--dry-run", nargs="?", const="client", choices=("client", "server", "none"),
                        default="none", help="client (alone: --dry-run): print, send nothing; server: "
                                             "the API server checks it and stores nothing")
    parser.add_argument("-o", "--output-format", dest="output_format", choices=("yaml", "json", "name"),
                        help="print the job (the built manifest with --dry-run) as yaml or json")
    add_cluster_flags(parser)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[leaf] = value


def load_manifests(filename: str) -> list[dict[str, Any]]:
    try:
        text = sys.stdin.read() if filename == "-" else Path(filename).read_text()
    except OSError as error:
        raise CommandError(f"cannot read {filename}: {error.strerror}") from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise CommandError(f"{filename} is not valid YAML: {error}") from None
    if not documents:
        raise CommandError(f"{filename} holds no object")
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            raise CommandError(f"{filename}: expected kind {KIND} (apiVersion {API_VERSION}), found {kind!r}; "
                               "use kubectl apply for other objects")
    return documents


def build(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The FineTuneJob(s) to apply: the manifest (if any) with the flags laid over it."""
    given = {flag: getattr(args, flag.dest) for flag in FLAGS if getattr(args, flag.dest, None) is not None}
    overrides = []
    for item in args.overrides:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise CommandError(f"--set {item!r}: write FIELD=VALUE, e.g. --set training.packing=true")
        overrides.append((path.strip().removeprefix("spec."), _value(value)))
    if args.filename:
        jobs = load_manifests(args.filename)
        if len(jobs) > 1 and (given or overrides or args.name):
            raise CommandError(f"{args.filename} holds {len(jobs)} jobs: a name or flags would apply to which? "
                               "Give a file with one job")
    else:
        if not args.name:
            raise CommandError("name the job (submit NAME --model ... ) or give a manifest with -f")
        jobs = [{"apiVersion": API_VERSION, "kind": KIND, "metadata": {}, "spec": {}}]
    for job in jobs:
        metadata = job.setdefault("metadata", {})
        if args.name:
            metadata["name"] = args.name
        if getattr(args, "namespace", None):
            metadata["namespace"] = args.namespace
        spec = job.setdefault("spec", {})
        for flag, value in given.items():
            _set(spec, flag.path, value)
        for path, value in overrides:
            _set(spec, path, value)
        validate(job)
    return jobs


def validate(job: dict[str, Any]) -> None:
    """kubetune.api's checks, as the API server will make them; the error names each field, the
    flag that sets it and the fix."""
    name = (job.get("metadata") or {}).get("name")
    problems = []
    if not name:
        problems.append("metadata.name: required field is missing (give the job a NAME)")
    else:
        try:
            check_job_name(name)
        except InvalidObjectError as error:
            problems.append(str(error))
    try:
        parse_spec(job.get("spec") or {})
    except InvalidObjectError as error:
        problems.append(str(error))
    if problems:
        message = "; ".join(problems)
        flags = flags_for(message)
        hint = f"\n  set with: {', '.join(flags)}" if flags else ""
        lines = "\n  ".join(_readable(clause) for clause in re.split(r"; (?=(?:spec|metadata)\.)", message))
        raise CommandError(f"the job is not valid, nothing was sent:\n  {lines}{hint}")


def _readable(clause: str) -> str:
    """pydantic's pattern errors as what to write instead."""
    return clause.replace(f"String should match pattern '{S3_URI_PATTERN}'",
                          "must be an s3:// URI, s3://BUCKET/KEY (a bucket of 3-63 lowercase letters, digits, '.', '-')")


def flags_for(message: str) -> list[str]:
    """The flags that set the spec fields ``message`` names (a missing section: its main flag)."""
    found: list[str] = []
    for mention in re.findall(r"spec\.([A-Za-z0-9_.]*[A-Za-z0-9])", message):
        exact = [flag for flag in FLAGS if flag.path == mention]
        under = [flag for flag in FLAGS if flag.path.startswith(mention + ".")][:1]
        for flag in exact or under or []:
            text = f"{flag.option} (spec.{flag.path})"
            if text not in found:
                found.append(text)
        if not exact and not under:
            text = f"--set {mention}=..."
            if text not in found:
                found.append(text)
    return found


@handles_errors
def main(args: argparse.Namespace) -> int:
    jobs = build(args)
    if args.dry_run == "client":
        _print(jobs, args.output_format or "yaml")
        return 0
    kubectl = Kubectl.from_args(args)
    document = yaml.safe_dump_all(jobs, sort_keys=False)
    command = ["apply", "-f", "-"]
    if args.dry_run == "server":
        command.append("--dry-run=server")
    if args.output_format:
        command += ["-o", args.output_format]
    result = kubectl.run(*command, input=document, check=False)
    if result.returncode != 0:
        raise CommandError(result.stderr.strip() or "kubectl apply failed")
    print(result.stdout, end="")
    if args.dry_run == "none" and not args.output_format:
        names = " ".join(job["metadata"]["name"] for job in jobs)
        ns = f" -n {args.namespace}" if getattr(args, "namespace", None) else ""
        print(f"follow it: {prog()} status {names}{ns}   |   logs -f   |   wait", file=sys.stderr)
    return 0


def _print(jobs: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        print(json.dumps(jobs[0] if len(jobs) == 1 else {"apiVersion": "v1", "kind": "List", "items": jobs},
                         indent=2))
    elif output == "name":
        for job in jobs:
            print(f"finetunejob.kubetune.dev/{job['metadata']['name']}")
    else:
        print(yaml.safe_dump_all(jobs, sort_keys=False), end="")
