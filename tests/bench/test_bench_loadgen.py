from __future__ import annotations

from pathlib import Path

import pytest

from bench.loadgen import (
    WrkError,
    parse_wrk_output,
    requests_per_second_line,
    wrk_command,
    wrk_threads,
)
from bench.payloads import Payload

TEXT = """Running 3s test @ http://127.0.0.1:8080/v2/models/tabular/infer
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.10ms    2.06ms   1.20s    90.70%
    Req/Sec     1.06k   130.22     1.21k    83.33%
  Latency Distribution
     50%  462.00us
     75%   15.43ms
     90%   16.41ms
     99%    1.02s
  6346 requests in 3.01s, 1.05MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 12
Requests/sec:   2108.36
Transfer/sec:    356.31KB
"""


def test_text_output_units_and_errors() -> None:
    rep = parse_wrk_output(TEXT)
    assert rep.requests == 6346
    assert rep.duration_s == pytest.approx(3.01)
    assert rep.p50_ms == pytest.approx(0.462)
    assert rep.p90_ms == pytest.approx(16.41)
    assert rep.p99_ms == pytest.approx(1020.0)
    assert rep.mean_ms == pytest.approx(15.10)
    assert rep.max_ms == pytest.approx(1200.0)
    assert rep.error_detail == {"connect": 1, "read": 2, "write": 3, "timeout": 4, "status": 12}
    assert rep.errors == 22
    assert rep.rps == pytest.approx(6346 / 3.01)
    assert requests_per_second_line(TEXT) == pytest.approx(2108.36)


def test_json_line_wins_over_text() -> None:
    line = (
        'BENCH_JSON {"requests":1000,"duration_us":2000000,"bytes":5,"connect":0,"read":0,"write":0,'
        '"status":7,"timeout":1,"mean_us":812.5,"p50_us":450,"p90_us":900,"p99_us":2500,"max_us":9000}'
    )
    rep = parse_wrk_output(TEXT + line + "\n")
    assert rep.requests == 1000
    assert rep.rps == pytest.approx(500.0)
    assert rep.p50_ms == pytest.approx(0.45)
    assert rep.p99_ms == pytest.approx(2.5)
    assert rep.errors == 8


def test_clean_run_has_no_errors() -> None:
    text = TEXT.replace("  Socket errors: connect 1, read 2, write 3, timeout 4\n", "").replace(
        "  Non-2xx or 3xx responses: 12\n", ""
    )
    assert parse_wrk_output(text).errors == 0


def test_unparseable_output_raises() -> None:
    with pytest.raises(WrkError):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused")


def test_threads_and_command(tmp_path: Path) -> None:
    assert [wrk_threads(c) for c in (1, 8, 32, 64)] == [1, 2, 2, 2]
    payload = Payload("v2-binary", "/v2/models/m/infer", tmp_path / "b", "application/octet-stream", 123, 10)
    cmd = wrk_command("http://127.0.0.1:9/", payload, 32, 10, 30)
    assert "-c32" in cmd and "-t2" in cmd and "-d10s" in cmd and "--latency" in cmd
    assert cmd[cmd.index("--") - 1] == "http://127.0.0.1:9/v2/models/m/infer"
    assert cmd[-3:] == [str(tmp_path / "b"), "application/octet-stream", "123"]
    json_payload = Payload("v2-json", "/x", tmp_path / "j", "application/json", None, 10)
    assert wrk_command("http://h", json_payload, 1, 3, 30)[-1] == "application/json"
