"""The `qsharp tabular` demo and the config loader."""

import dataclasses
import re

import pytest

from qsharp_jax import cli, config, demo


def test_tabular_demo_reports_optimality(capsys, tmp_path):
    plot = tmp_path / "plot.png"
    assert cli.main(["tabular", "depths=[2,3]", "vocabs=[3]", "etas=[0.1,0.01]", f"plot={plot}"]) == 0
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
    cfg = config.load(demo.TabularConfig, "experiments/tabular/config.yaml")
    assert cfg.etas == (1.0, 0.1, 0.01, 0.001) and cfg.depths == (2, 3, 4)


def test_bad_override_exits_with_clear_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tabular", "etaz=[0.1]"])
    assert exit_info.value.code == 2
    assert "unknown config key(s) ['etaz']" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class Inner:
    depth: int = 2
    name: str = "x"


@dataclasses.dataclass(frozen=True)
class Outer:
    eta: float = 0.1
    sizes: tuple[int, ...] = (1,)
    pair: tuple[int, float] = (1, 2.0)
    path: str | None = None
    inner: Inner = Inner()


def test_config_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("eta: 1\ninner:\n  name: y\n")
    cfg = config.load(Outer, f, ["sizes=[3,4]", "inner.depth=5", "path=null", "pair=[2, 3]"])
    assert cfg == Outer(eta=1.0, sizes=(3, 4), pair=(2, 3.0), path=None, inner=Inner(depth=5, name="y"))
    assert isinstance(cfg.eta, float)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eta=abc"], "'eta' must be of type float"),
        (["sizes=[1, 2.5]"], "'sizes' must be of type int"),
        (["inner.depht=3"], r"unknown config key\(s\) \['inner.depht'\]"),
        (["eta"], "must look like key=value"),
        (["pair=[1]"], "needs 2 items"),
        (["inner=3"], "needs a mapping"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config.load(Outer, None, overrides)
