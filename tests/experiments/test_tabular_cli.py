"""`python -m experiments.tabular` (``make tabular``): its report and its config errors."""

import re

import pytest

from experiments.tabular import compare
from experiments.tabular.__main__ import main as tabular_main
from qsharp_jax import config


def test_tabular_demo_reports_optimality(capsys, tmp_path):
    plot = tmp_path / "plot.png"
    assert tabular_main(["depths=[2,3]", "vocabs=[3]", "etas=[0.1,0.01]", f"plot={plot}"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+[\d.e-]+\s+\d+ \|", line)]
    assert len(rows) == 4
    for line in rows:
        err, j_star, j_q, j_cd, j_ref = map(float, re.findall(r"-?\d+\.\d+(?:e-?\d+)?", line.split("|", 1)[1]))
        assert err < 1e-4
        assert abs(j_q - j_star) < 1e-3 and j_cd <= j_star + 1e-4 and j_ref <= j_star + 1e-4
    risky = [line for line in out.splitlines() if line.strip().startswith("0.1 |")]
    p_star, p_q, p_cd = map(float, risky[0].split("|")[1].split())
    assert p_star == p_q and p_star > 0.9 and p_cd < 0.05
    assert plot.stat().st_size > 10_000  # a real figure, not an empty file


def test_demo_config_file_loads():
    cfg = config.load(compare.TabularConfig, "experiments/tabular/config.yaml")
    assert cfg.etas == (1.0, 0.1, 0.01, 0.001) and cfg.depths == (2, 3, 4)


def test_bad_override_exits_with_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tabular_main(["etaz=[0.1]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Unrecognized options: etaz" in err and "Perhaps you meant: etas" in err
