"""The statistics extension sums what every process wrote to the multiprocess directory.

prometheus-client's multiprocess mode writes ``<kind>_<pid>.db`` files into
``PROMETHEUS_MULTIPROC_DIR`` from any process that has it set, relative paths
resolved against the working directory. The writers and the reader run here as
subprocesses with the directory and working directory under ``tmp_path``: a check
of ``stats.collect`` needs no hand run in the repository (which is how three
``.db`` files once ended up committed at its root).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.metrics_process import run_with_metrics_dir

WRITE = """
import sys
from model_server import metrics
last = float(sys.argv[1])
metrics.REQUEST_DURATION.labels("m", "1", "v2", "success").observe(0.5)
metrics.REQUEST_DURATION.labels("m", "1", "v2", "fail").observe(0.25)
metrics.QUEUE_DURATION.labels("m", "1").observe(0.125)
metrics.COMPUTE_DURATION.labels("m", "1").observe(0.0625)
metrics.BATCH_ROWS.labels("m", "1", "0").observe(4)
metrics.LAST_INFERENCE.labels("m", "1").set(last)
metrics.REQUESTS.labels("other", "2", "v1", "200").inc()
"""

READ = """
import json
from frontend import stats
print(json.dumps(stats.model_stats([("m", "1"), ("never", "1")])))
"""


def test_statistics_sum_every_process(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    for last in ("1000", "3000"):  # two "frontends"
        run_with_metrics_dir(WRITE, tmp_path, directory, last)
    body = json.loads(run_with_metrics_dir(READ, tmp_path, directory))
    m, never = body["model_stats"]
    assert (m["name"], m["version"]) == ("m", "1")
    stats = m["inference_stats"]
    assert stats["success"] == {"count": 2, "ns": 1_000_000_000}
    assert stats["fail"] == {"count": 2, "ns": 500_000_000}
    assert stats["queue"] == {"count": 2, "ns": 250_000_000}
    assert stats["compute_infer"] == {"count": 2, "ns": 125_000_000}
    assert (m["inference_count"], m["execution_count"], m["last_inference"]) == (8, 2, 3000)
    assert never["inference_count"] == 0 and never["inference_stats"]["success"] == {"count": 0, "ns": 0}
    # Every file went where it was told (the reader writes its own gauges too), none into the
    # working directory.
    assert {p.name.split("_")[0] for p in directory.glob("*.db")} == {"counter", "gauge", "histogram"}
    assert not list(tmp_path.glob("*.db"))
