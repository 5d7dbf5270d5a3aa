"""Trainer benchmark: kubetune's trainer against what its users would pick instead.

    make bench                          # every workload, about 2 hours on 2 CPU cores
    python benchmarks/trainer_bench.py --workload chat-128k   # one of them
    python benchmarks/trainer_bench.py --quick   # seconds of each: checks the harness only

Workloads (workload.py): ``text`` (a 20M-parameter model, 8k vocabulary, plain text) and the
realistic ``chat-128k`` and ``chat-32k`` (real-size vocabularies, multi-turn chat with the loss
on the assistant's replies only, 32 to 1,024 tokens). In each, every contender trains the same
config-built model on the same data with the same LoRA, schedule and batch sizes, under
DeepSpeed ZeRO-2 on 2 torchrun processes:

- kubetune        the real trainer, as a worker pod runs it: config file, data and model from
                  S3 (moto over HTTP), metrics endpoint, checkpoints to S3, adapter published
- bare            a bare torch + DeepSpeed loop doing kubetune's work and nothing else
- hf_default      HF Trainer + PEFT + DeepSpeed, default padding and random order
- hf_group_by_length  HF Trainer, train_sampling_strategy="group_by_length"
- hf_flatten      HF Trainer, padding-free DataCollatorWithFlattening

Every contender runs ``--repeat`` times (default 2), in interleaved rounds, and keeps its
fastest run: on a shared machine the slower runs measure the neighbours. Throughput is
effective tokens/s: real (not padding) tokens trained / seconds of the training
loop (start-up, evaluation and saving excluded for everyone), all ranks together. Every adapter
is then scored by the same evaluation (workload.evaluate) on held-out data. Peak memory is the
largest peak resident set of any rank; wall time is torchrun's, from its start to the saved
(for kubetune: published) adapter.

Writes benchmarks/results/trainer.json and the results table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from workload import LLAMA2_VOCABULARY, LLAMA3_VOCABULARY, Workload, build, evaluate  # noqa: E402

from kubetune.trainer.timings import describe  # noqa: E402

CONTENDERS = ["kubetune", "hf_group_by_length", "bare", "hf_flatten", "hf_default"]
HF_VARIANTS = {"hf_default": "default", "hf_group_by_length": "group_by_length", "hf_flatten": "flatten"}
PROCESSES = 2
ACCESS_KEY = SECRET_KEY = "kubetune-bench"
TABLE_BEGIN, TABLE_END = "<!-- trainer-bench:begin -->", "<!-- trainer-bench:end -->"
WORKLOADS = {
    "text": (Workload, Workload.quick),
    "chat-128k": (lambda: Workload.realistic(LLAMA3_VOCABULARY), Workload.realistic_quick),
    "chat-32k": (lambda: Workload.realistic(LLAMA2_VOCABULARY), Workload.realistic_quick),
}
"""Name: (the workload, its --quick stand-in)."""
REALISTIC, REALISTIC_32K = "chat-128k", "chat-32k"


def markers(workload: str) -> tuple[str, str]:
    """The BENCHMARKS.md section a workload's table goes in."""
    if workload == "text":
        return TABLE_BEGIN, TABLE_END
    return f"<!-- trainer-bench-{workload}:begin -->", f"<!-- trainer-bench-{workload}:end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny workloads: checks the harness, reports nothing")
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS),
                        help="which workloads (default: all)")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, help="run only these contenders")
    parser.add_argument("--repeat", type=int, default=2,
                        help="rounds of all contenders; each keeps its fastest run (default 2)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "trainer")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "trainer.json",
                        help="where the JSON goes; written after a full run of every contender, "
                             "otherwise only when given")
    args = parser.parse_args(argv)

    previous = json.loads(args.results.read_text()) if args.results.is_file() else {}
    reports = dict(previous.get("workloads") or {})
    if "contenders" in previous and "text" not in reports:  # written before there were several workloads
        reports["text"] = {key: previous[key] for key in ("summary", "contenders", "workload", "measuredAt")
                           if key in previous}
    complete_names, seen = [], []
    for name in args.workload:
        full, quick = WORKLOADS[name]
        workload = quick() if args.quick else full()
        if workload in seen:
            continue  # --quick: both chat workloads have one stand-in
        seen.append(workload)
        workdir = args.workdir / ("quick" if args.quick else "full") / name
        runs, base_eval = _run_workload(workload, workdir, args.only or CONTENDERS, args.repeat)
        report = _workload_report(workload, runs, base_eval)
        print(json.dumps(report["summary"], indent=2), flush=True)
        if not args.quick and set(runs) == set(CONTENDERS):
            reports[name] = report
            complete_names.append(name)
    report = _report(reports)
    if complete_names or "--results" in (argv if argv is not None else sys.argv):
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.results}")
    for name in complete_names:
        _write_table(ROOT / "BENCHMARKS.md", {**report, **reports[name]}, *markers(name))
    return 0


def _run_workload(workload: Workload, workdir: Path, contenders: list[str], repeat: int) -> tuple[dict, float]:
    """Every contender ``repeat`` times in interleaved rounds (a slow minute of a shared machine
    hits them alike); each keeps its fastest run, the one least disturbed."""
    paths = build(workload, workdir / "workload")
    (workdir / "workload.json").write_text(json.dumps(workload.to_json()))
    print(f"workload {workload.name}: {workload.train_examples} train / {workload.eval_examples} eval examples, "
          f"model {_parameters(paths['model']) / 1e6:.1f}M parameters", flush=True)
    attempts: dict[str, list[dict]] = {}
    for round_ in range(repeat):
        for name in contenders:
            out = workdir / name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            run = (_run_kubetune(workload, paths, out) if name == "kubetune"
                   else _run_script(name, paths, workdir, out))
            run["evalLoss"] = evaluate(workload, paths["model"], out / "adapter", paths["eval"])
            run["tokensPerSecond"] = run["tokens"] / run["trainSeconds"]
            attempts.setdefault(name, []).append(run)
            print(f"{workload.name} round {round_ + 1} {name:20s} {run['tokensPerSecond']:8.1f} tok/s  "
                  f"padding {1 - run['tokens'] / run['positions']:6.1%}  eval loss {run['evalLoss']:.4f}  "
                  f"peak {run['peakMemoryBytes'] / 2**20:,.0f} MiB  "
                  f"({run['trainSeconds']:.0f}s training, {run['wallSeconds']:.0f}s in all)", flush=True)
    runs = {}
    for name, tries in attempts.items():
        runs[name] = {**max(tries, key=lambda run: run["tokensPerSecond"]),
                      "allTokensPerSecond": [round(run["tokensPerSecond"], 1) for run in tries]}
    return runs, evaluate(workload, paths["model"], None, paths["eval"])


def _run_kubetune(workload: Workload, paths: dict[str, Path], out: Path) -> dict:
    """The trainer exactly as a worker pod runs it, against a real S3 endpoint."""
    import yaml

    from kubetune.localcluster.s3server import S3Server
    from kubetune.api.spec import Storage
    from kubetune.trainer.s3 import download_prefix, make_client

    server = S3Server.start(["127.0.0.1"], str(out / "s3.log"))
    try:
        endpoint = server.url("127.0.0.1")
        s3 = make_client(Storage(endpoint=endpoint), access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        for bucket in ("models", "datasets", "adapters", "checkpoints"):
            s3.create_bucket(Bucket=bucket)
        for path in sorted(paths["model"].iterdir()):
            s3.upload_file(str(path), "models", f"bench/{path.name}")
        s3.upload_file(str(paths["train"]), "datasets", "bench/train.jsonl")
        config = {
            "schemaVersion": 1,
            "job": {"namespace": "bench", "name": "trainer-bench", "uid": "bench"},
            "model": {"uri": "s3://models/bench/"},
            "dataset": {"uri": "s3://datasets/bench/train.jsonl", "format": workload.format},
            "lora": {"r": workload.lora_r, "alpha": workload.lora_alpha, "dropout": 0.0,
                     "targetModules": list(workload.lora_targets)},
            "training": {"epochs": 1, "learningRate": workload.learning_rate, "minLearningRate": 0.0,
                         "warmupSteps": workload.warmup_steps, "microBatchSize": workload.micro_batch_size,
                         "globalBatchSize": workload.global_batch_size, "sequenceLength": workload.sequence_length,
                         "seed": workload.seed, "logEverySteps": 10, "gradientClipping": 1.0},
            "deepspeed": {"zeroStage": 2, "offload": "none"},
            "output": {"adapterUri": "s3://adapters/bench/", "checkpointUri": "s3://checkpoints/bench/",
                       "checkpointEverySteps": 20, "keepCheckpoints": 2},
            "storage": {"endpoint": endpoint, "region": "us-east-1"},
            "metrics": {"port": _free_port()},
        }
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "KUBETUNE_WORKDIR": str(out / "scratch")}
        wall = _torchrun(["-m", "kubetune.trainer", "--config", str(out / "config.yaml")], out, env)
        download_prefix(s3, "s3://adapters/bench/", out / "adapter")
    finally:
        server.stop()
    results = json.loads((out / "adapter" / "manifest.json").read_text())["results"]
    return {"tokens": results["tokens"], "positions": results["positions"], "trainSeconds": results["trainSeconds"],
            "steps": results["steps"], "peakMemoryBytes": results["peakMemoryBytes"], "wallSeconds": wall,
            "timeToAdapter": results["timeToAdapter"]}


def _run_script(name: str, paths: dict[str, Path], workdir: Path, out: Path) -> dict:
    script = HERE / "contenders" / ("bare_loop.py" if name == "bare" else "hf_trainer.py")
    argv = [str(script), "--model", str(paths["model"]), "--train", str(paths["train"]),
            "--workload", str(workdir / "workload.json"), "--out", str(out / "adapter"),
            "--result", str(out / "result.json")]
    if name in HF_VARIANTS:
        argv += ["--variant", HF_VARIANTS[name]]
    wall = _torchrun(argv, out, {})
    return {**json.loads((out / "result.json").read_text()), "wallSeconds": wall}


def _torchrun(argv: list[str], out: Path, env: dict[str, str]) -> float:
    """Run ``argv`` under torchrun; the seconds it took."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={PROCESSES}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *argv]
    started = time.perf_counter()
    with (out / "log.txt").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
    wall = round(time.perf_counter() - started, 1)
    if done.returncode:
        tail = (out / "log.txt").read_text().splitlines()[-30:]
        raise SystemExit(f"{' '.join(argv[:3])} failed ({done.returncode}); last lines of {out / 'log.txt'}:\n"
                         + "\n".join(tail))
    return wall


def _workload_report(workload: Workload, runs: dict[str, dict], base_eval: float) -> dict:
    """One workload's figures: the contenders' runs and kubetune's ratios to them."""
    rate = {name: run["tokensPerSecond"] for name, run in runs.items()}
    summary: dict = {"baseEvalLoss": base_eval}
    if "kubetune" in runs:
        kubetune = runs["kubetune"]
        summary["eval_loss"] = kubetune["evalLoss"]
        summary["eval_loss_fall"] = base_eval - kubetune["evalLoss"]
        hf = [name for name in HF_VARIANTS if name in runs]
        if "hf_default" in runs:
            summary["ratio_vs_hf"] = rate["kubetune"] / rate["hf_default"]
            summary["eval_loss_hf"] = runs["hf_default"]["evalLoss"]
        if hf:
            best = max(hf, key=rate.get)
            summary["hf_best"] = best
            summary["ratio_vs_hf_best"] = rate["kubetune"] / rate[best]
            summary["eval_loss_hf_best"] = runs[best]["evalLoss"]
            if "peakMemoryBytes" in kubetune and "peakMemoryBytes" in runs[best]:
                summary["memory_ratio_vs_hf_best"] = kubetune["peakMemoryBytes"] / runs[best]["peakMemoryBytes"]
            if "wallSeconds" in kubetune and "wallSeconds" in runs[best]:
                summary["wall_ratio_vs_hf_best"] = kubetune["wallSeconds"] / runs[best]["wallSeconds"]
        if "bare" in runs:
            summary["ratio_vs_bare"] = rate["kubetune"] / rate["bare"]
    return {"summary": summary, "baseEvalLoss": base_eval, "contenders": runs, "workload": workload.to_json(),
            "measuredAt": datetime.now(UTC).isoformat(timespec="seconds")}


def _report(workloads: dict[str, dict]) -> dict:
    """trainer.json: the text workload's summary at the top (the keys the first issue named),
    ``realistic`` for chat-128k with ``vocab32k`` for chat-32k, and every workload in full."""
    report: dict = {}
    if "text" in workloads:
        report.update(workloads["text"]["summary"])
        report["summary"] = workloads["text"]["summary"]
        report["contenders"] = workloads["text"]["contenders"]
    if REALISTIC in workloads:
        report["realistic"] = dict(workloads[REALISTIC]["summary"])
        if REALISTIC_32K in workloads:
            report["realistic"]["vocab32k"] = workloads[REALISTIC_32K]["summary"]
    report.update({
        "workloads": workloads,
        "processes": PROCESSES,
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "packages": _versions()},
        "measuredAt": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    return report


def _write_table(markdown: Path, report: dict, begin: str = TABLE_BEGIN, end: str = TABLE_END) -> None:
    """One workload's table between its markers (appended to the file when they are not there
    yet); the rest of the file stays as it is."""
    runs = report["contenders"]
    memory = all("peakMemoryBytes" in run for run in runs.values())
    wall = all("wallSeconds" in run for run in runs.values())
    lines = [begin, "",
             f"Measured {report['measuredAt']} on {report['machine']['cpu']} ({report['machine']['cores']} cores), "
             f"{report['processes']} processes, fp32.", "",
             "| contender | effective tokens/s | padding | training s |" + (" peak MiB per rank |" if memory else "")
             + (" wall s |" if wall else "") + " eval loss | kubetune is |",
             "|---|---:|---:|---:|" + ("---:|" if memory else "") + ("---:|" if wall else "") + "---:|---:|"]
    for name, run in runs.items():
        versus = "" if name == "kubetune" else f"{runs['kubetune']['tokensPerSecond'] / run['tokensPerSecond']:.2f}x"
        lines.append(f"| {name} | {run['tokensPerSecond']:.0f} | {1 - run['tokens'] / run['positions']:.1%} | "
                     f"{run['trainSeconds']:.0f} | " + (f"{run['peakMemoryBytes'] / 2**20:,.0f} | " if memory else "")
                     + (f"{run['wallSeconds']:.0f} | " if wall else "") + f"{run['evalLoss']:.3f} | {versus} |")
    rounds = [f"{name} {', '.join(f'{rate:.0f}' for rate in run['allTokensPerSecond'])}"
              for name, run in runs.items() if "allTokensPerSecond" in run]
    if rounds:
        lines += ["", "Tokens/s of every round (the table keeps each contender's fastest): " + "; ".join(rounds) + "."]
    breakdown = runs.get("kubetune", {}).get("timeToAdapter")
    if breakdown:
        lines += ["", f"kubetune's {describe(breakdown)}."]
    lines += ["", f"Evaluation loss of the base model before training: {report['baseEvalLoss']:.3f}.", "", end]
    text = markdown.read_text() if markdown.is_file() else ""
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    markdown.write_text(head + "\n".join(lines) + rest.split(end, 1)[1])


def _parameters(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    h, v, f, n = config["hidden_size"], config["vocab_size"], config["intermediate_size"], config["num_hidden_layers"]
    return 2 * v * h + n * (4 * h * h + 3 * h * f + 2 * h) + h


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "deepspeed", "transformers", "peft", "accelerate")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
