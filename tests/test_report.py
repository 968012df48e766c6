"""Reports: ModelSummary's dict form (to_dict, and as_dict, its earlier name)."""
import json

from tensorslim.report import ModelSummary, summary_table


def test_model_summary_to_dict_and_its_old_name():
    row = ModelSummary("tucker 4x", 0.9125, 1_234_567, 89_000_000, 3.5)
    d = row.to_dict()
    assert d == {"label": "tucker 4x", "accuracy": 0.9125, "params": 1_234_567,
                 "macs": 89_000_000, "latency_ms": 3.5, "latency1_ms": None}
    assert row.as_dict() == d
    assert ModelSummary(**json.loads(json.dumps(d))) == row


def test_summary_table_ratios_against_the_first_row():
    rows = [ModelSummary("dense", 0.92, 100, 400, 8.0), ModelSummary("comp", 0.90, 40, 100, 2.0)]
    lines = summary_table(rows).splitlines()
    assert lines[2].split() == ["comp", "90.00", "40", "100", "4.00x", "2.00", "4.00x"]
    md = summary_table(rows, markdown=True).splitlines()
    assert md[3] == "| comp | 90.00 | 40 | 100 | 4.00x | 2.00 | 4.00x |"


def test_summary_table_batch_1_columns_when_measured():
    rows = [ModelSummary("dense", 0.92, 100, 400, 8.0, 1.5), ModelSummary("comp", 0.90, 40, 100, 2.0, 1.0)]
    head, _, comp = summary_table(rows).splitlines()
    assert head.split()[-4:] == ["batch-1", "ms", "batch-1", "speed-up"]
    assert comp.split() == ["comp", "90.00", "40", "100", "4.00x", "2.00", "4.00x", "1.00", "1.50x"]
    one = [ModelSummary("dense", 0.92, 100, 400, 8.0, 1.5), ModelSummary("comp", 0.90, 40, 100, 2.0)]
    assert summary_table(one).splitlines()[2].split()[-2:] == ["-", "-"]
