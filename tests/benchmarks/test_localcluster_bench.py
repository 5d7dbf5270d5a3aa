"""The local cluster benchmark's own parts (it runs in ``make bench-local``, not here): the
ratios against the baseline, and a table written without disturbing the rest of BENCHMARKS.md."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import localcluster_bench  # noqa: E402


def _round(up: float, **rss: float) -> dict:
    return {"upSeconds": up, "downSeconds": 1.0, "rssMiB": dict(rss)}


def test_summary_takes_medians_and_compares_with_the_baseline() -> None:
    baseline = [_round(4.0, etcd=50, **{"kube-apiserver": 250}), _round(6.0, etcd=50, **{"kube-apiserver": 350})]
    ours = [
        _round(9.0, etcd=60, **{"kube-apiserver": 400, "kube-controller-manager": 100, "kube-scheduler": 50,
                                "node agent": 90, "s3 (moto)": 80}),
        _round(11.0, etcd=60, **{"kube-apiserver": 400, "kube-controller-manager": 100, "kube-scheduler": 50,
                                 "node agent": 90, "s3 (moto)": 80}),
    ]
    report = localcluster_bench.summarise(baseline, ours)
    assert report["kubetune"]["upSeconds"] == 10.0 and report["baseline"]["upSeconds"] == 5.0
    assert report["upRatioVsBaseline"] == 2.0
    assert report["kubetune"]["clusterRssMiB"] == 700  # S3 is reported apart
    assert report["rssRatioVsBaseline"] == 700 / 350


def test_table_replaces_only_its_own_section(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\n\nintro\n\n{localcluster_bench.TABLE_BEGIN}\nold\n{localcluster_bench.TABLE_END}\n\ntail\n")
    report = localcluster_bench.summarise([_round(5.0, etcd=50)], [_round(10.0, etcd=60, **{"node agent": 90})])
    localcluster_bench.write_table(markdown, report)
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n") and text.endswith("\n\ntail\n") and "old" not in text
    assert "| up, to a schedulable node (s) | 10.0 | 5.0 | 2.00x | <= 20 |" in text
