"""`effdense demo` as a user runs it: the real demo config, trained on this machine's CPU."""

import json

from tasks.cli import main


def test_demo_reaches_90_percent_top1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo writes runs/demo-data and its run directory here
    assert main(["demo", "--output", str(tmp_path / "run"), "--set", "train.progress=false"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["top1"] >= 0.9
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val/top1"] == metrics["top1"]
