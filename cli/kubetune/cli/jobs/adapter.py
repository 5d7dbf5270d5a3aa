"""`kubectl kubetune adapter NAME [--download DIR]`: the adapter a job published.

Without --download: what the published ``manifest.json`` says (base model, files, results).
With it: every file listed in the manifest is downloaded into DIR and its sha256 and size checked
against the manifest, which is itself first checked against the digest the job recorded
(``status.adapter.manifestSha256``): a manifest another job wrote over it since, or a file changed
in S3, is refused. Then how to load it with PEFT and serve it with vLLM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune.cli.jobs.common import describe_command, CommandError, Kubectl, add_cluster_flags, handles_errors, prog
from kubetune.cli.jobs.s3 import Store, add_s3_flags, join, store_for

HELP = "download the published adapter (--download DIR), verify every sha256, show how to load and serve it"
MANIFEST = "manifest.json"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe_command(parser, __doc__)
    parser.add_argument("name", help="the FineTuneJob")
    parser.add_argument("--download", metavar="DIR", help="download the adapter into DIR and verify it")
    add_s3_flags(parser)
    add_cluster_flags(parser)


def published_manifest(job: dict[str, Any], store: Store) -> tuple[str, dict[str, Any], bytes]:
    """(adapter URI, manifest, its bytes) of the adapter this job published; a CommandError when there is
    none yet, or when the manifest at its URI is not the one the job recorded."""
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    adapter = status.get("adapter") or {}
    uri = adapter.get("uri")
    if not uri:
        phase = status.get("phase") or "not reconciled yet"
        later = (f"; it is published when training ends (`{prog()} wait {name}`)"
                 if phase not in ("Succeeded", "Failed") else "")
        raise CommandError(f"{name} has no published adapter (phase {phase}){later}")
    document = store.get(join(uri, MANIFEST))
    if document is None:
        raise CommandError(f"no {MANIFEST} at {uri}: the adapter was removed, or is being replaced")
    digest = hashlib.sha256(document).hexdigest()
    expected = adapter.get("manifestSha256")
    if expected and digest != expected:
        raise CommandError(f"{join(uri, MANIFEST)} is not the manifest {name} published (sha256 {digest[:12]}, "
                           f"the job recorded {expected[:12]}): another job has published there since")
    try:
        manifest = json.loads(document)
    except ValueError as error:
        raise CommandError(f"{join(uri, MANIFEST)} is not valid JSON: {error}") from None
    return uri, manifest, document


def _safe_path(entry: str) -> PurePosixPath:
    path = PurePosixPath(entry)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise CommandError(f"{MANIFEST} lists a file outside the adapter folder: {entry!r}")
    return path


def download(store: Store, uri: str, manifest: dict[str, Any], directory: Path) -> list[str]:
    """Every file of the manifest into ``directory``; the problems (a file whose sha256 or size
    differs is removed again, so nothing loads it by mistake)."""
    problems = []
    for entry in manifest.get("files") or []:
        relative = _safe_path(entry["path"])
        target = directory.joinpath(*relative.parts)
        digest = store.download(join(uri, relative.as_posix()), target)
        size = target.stat().st_size
        if digest != entry.get("sha256") or size != entry.get("size"):
            target.unlink()
            problems.append(f"{relative}: sha256 {digest} ({size} bytes) but the manifest says "
                            f"{entry.get('sha256')} ({entry.get('size')} bytes); removed")
    return problems


def lora_rank(manifest: dict[str, Any], job: dict[str, Any]) -> int:
    config_lora = (manifest.get("trainerConfig") or {}).get("lora") or {}
    return int(config_lora.get("r") or ((job.get("spec") or {}).get("lora") or {}).get("r") or 8)


def vllm_max_lora_rank(rank: int) -> int:
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), rank)


def usage(name: str, directory: str, manifest: dict[str, Any], rank: int) -> str:
    base_uri = (manifest.get("baseModel") or {}).get("uri", "the base model")
    return "\n".join([
        f"Load it with PEFT (BASE: a local copy of {base_uri}, e.g. `aws s3 sync {base_uri} ./base`):",
        "    from transformers import AutoModelForCausalLM, AutoTokenizer",
        "    from peft import PeftModel",
        '    base = AutoModelForCausalLM.from_pretrained("BASE")',
        f'    model = PeftModel.from_pretrained(base, "{directory}")',
        f'    tokenizer = AutoTokenizer.from_pretrained("{directory}")',
        "Serve it with vLLM (OpenAI API; request it as model "
        f'"{name}"):',
        f"    vllm serve BASE --enable-lora --lora-modules {name}={directory} --max-lora-rank {vllm_max_lora_rank(rank)}",
    ])


def describe(uri: str, manifest: dict[str, Any]) -> str:
    results = manifest.get("results") or {}
    job = manifest.get("job") or {}
    lines = [f"Adapter   {uri}",
             f"Job       {job.get('namespace', '?')}/{job.get('name', '?')} (uid {job.get('uid', '?')})",
             f"Base      {(manifest.get('baseModel') or {}).get('uri', '?')}",
             f"Dataset   {(manifest.get('dataset') or {}).get('uri', '?')}",
             f"Created   {manifest.get('createdAt', '?')} by kubetune {manifest.get('kubetuneVersion', '?')}"]
    if results:
        figures = [f"{results.get('steps')} steps"]
        if results.get("finalLoss") is not None:
            figures.append(f"loss {results['finalLoss']:.4f}")
        if results.get("evalLoss") is not None:
            figures.append(f"eval loss {results['evalLoss']:.4f}")
        if results.get("tokens"):
            figures.append(f"{results['tokens']:,} tokens")
        lines.append(f"Results   {', '.join(figures)}")
    lines.append("Files")
    for entry in manifest.get("files") or []:
        lines.append(f"  {entry['path']:<32} {entry.get('size', 0):>12,}  sha256 {str(entry.get('sha256'))[:16]}")
    return "\n".join(lines)


@handles_errors
def main(args: argparse.Namespace) -> int:
    kubectl = Kubectl.from_args(args)
    job = kubectl.job(args.name)
    store = store_for(job, kubectl, args)
    uri, manifest, document = published_manifest(job, store)
    if not args.download:
        print(describe(uri, manifest))
        print(f"\nDownload and verify it: {prog()} adapter {args.name} --download DIR")
        return 0
    directory = Path(args.download)
    directory.mkdir(parents=True, exist_ok=True)
    problems = download(store, uri, manifest, directory)
    (directory / MANIFEST).write_bytes(document)
    files = manifest.get("files") or []
    if problems:
        print(f"{prog()} adapter: {len(problems)} of {len(files)} files of {uri} do not match its {MANIFEST}; "
              f"{directory} is NOT a verified copy:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    total = sum(entry.get("size", 0) for entry in files)
    print(f"Downloaded {uri} to {directory}: {len(files)} files, {total:,} bytes, every sha256 matches "
          f"{MANIFEST} (itself the one {args.name} published)")
    print(usage(args.name, str(directory), manifest, lora_rank(manifest, job)))
    return 0
