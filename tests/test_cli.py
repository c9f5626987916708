"""The `qsharp` command and the config loader."""

import dataclasses
import json
import re

import pytest

from qsharp_jax import cli, config


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


def test_a_config_extends_another_and_merges_nested_fields(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text("eta: 0.5\nsizes: [1, 2]\ninner: {depth: 7, name: b}\n")
    (tmp_path / "mid.yaml").write_text("extends: recipes/base.yaml\ninner: {name: m}\n")
    (tmp_path / "leaf.yaml").write_text("extends: mid.yaml\nsizes: [9]\n")
    # nested mappings merge key by key; lists and scalars replace; overrides still win
    assert config.load(Outer, tmp_path / "leaf.yaml", ["eta=0.25"]) == \
        Outer(eta=0.25, sizes=(9,), inner=Inner(depth=7, name="m"))
    assert config.load(Outer, tmp_path / "mid.yaml") == Outer(eta=0.5, sizes=(1, 2), inner=Inner(depth=7, name="m"))


@pytest.mark.parametrize(
    "files,message",
    [
        ({"a.yaml": "extends: a.yaml\n"}, r"extends makes a cycle \(.*a.yaml -> .*a.yaml\)"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, r"makes a cycle .*b.yaml -> .*a.yaml"),
        ({"a.yaml": "extends: gone.yaml\n"}, r"config file .*gone.yaml not found \(extended by .*a.yaml\)"),
        ({"a.yaml": "extends: [b.yaml]\n"}, r"extends must be the path of another YAML config"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "eta: [\n"}, r"b.yaml is not valid YAML.*\(extended by .*a.yaml\)"),
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "etta: 1\n"}, r"Perhaps you meant: eta"),
    ],
)
def test_config_extends_errors(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        config.load(Outer, tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eta=abc"], "eta: could not convert string to float: 'abc'"),
        (["sizes=[1, 2.5]"], "sizes: "),
        (["inner.depht=3"], "Unrecognized options: inner.depht, 3 Perhaps you meant: inner.depth"),
        (["eta"], "must look like key=value"),
        (["pair=[1]"], "pair"),
        (["inner=3"], "Unrecognized options: inner"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config.load(Outer, None, overrides)


def test_train_and_plot_commands(tmp_path, capsys):
    """`qsharp train` on a small version of the toy config (two iterations, on a mesh), then eval,
    sample, a refused and an allowed resume, and plot. (That it learns: test_algorithm.py.)"""
    run_dir = tmp_path / "run"
    args = ["train", "experiments/planted_token/config.yaml", f"run_dir={run_dir}", "mesh=[2,2,2]",
            "algorithm.prompts_per_iteration=16", "algorithm.epochs=2", "algorithm.iterations=2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [0, 1]
    assert [int(r[1]) for r in rows] == [64, 128]  # examples aggregated over iterations
    for name in ("metrics.jsonl", "learning_curves.png", "checkpoints", "data", "tensorboard"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "tensorboard").iterdir())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert cli.main(["eval", str(run_dir)]) == 0  # the newest checkpoint reproduces the last metrics
    assert f"guided_reward={last['guided_reward']:.4g}" in capsys.readouterr().out
    assert cli.main(["sample", str(run_dir), "--num", "3"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("prompt")]) == 3
    with pytest.raises(SystemExit):  # resuming with another config is refused, naming the field
        cli.main([*args, "algorithm.eta=0.2"])
    assert "fields that differ: algorithm.eta" in capsys.readouterr().err
    assert cli.main([*args[:-1], "algorithm.iterations=3"]) == 0  # extending the run is allowed
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert cli.main(["plot", str(run_dir), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        cli.main(["plot", str(tmp_path / "nothing")])
    assert "not found" in capsys.readouterr().err


def test_a_config_saved_before_a_field_existed_resumes_with_its_default():
    saved = {"algorithm": {"eta": 0.1}}  # written before algorithm.top_p existed
    defaults = {"algorithm": {"eta": 0.1, "top_p": 1.0}}
    assert config.differences(saved, {"algorithm": {"eta": 0.1, "top_p": 1.0}}, defaults=defaults) == []
    assert config.differences(saved, {"algorithm": {"eta": 0.1, "top_p": 0.9}}, defaults=defaults) == [
        "algorithm.top_p (saved 1.0, now 0.9)"]
    assert config.differences(saved, {"algorithm": {"eta": 0.1, "top_p": 1.0}}) == [
        "algorithm.top_p (saved None, now 1.0)"]


@pytest.mark.parametrize("raw,steps", [("true", 1), ("false", 0), ("3", 3)])
def test_lookahead_written_as_a_flag_reads_as_steps(raw, steps):
    """``algorithm.lookahead`` was a flag before it counted π_ref steps: old configs still load."""
    from qsharp_jax.algorithm import AlgorithmConfig

    cfg = config.load(AlgorithmConfig, None, [f"lookahead={raw}"])
    assert cfg.lookahead == steps and type(cfg.lookahead) is int
    with pytest.raises(ValueError, match="lookahead .* must be >= 0"):
        config.load(AlgorithmConfig, None, ["lookahead=-1"])


@pytest.mark.parametrize("model", ["llama3_8b", "llama31_8b", "qwen25_7b"])
def test_math_recipes_differ_from_their_gsm8k_recipe_only_in_the_data(model):
    from pathlib import Path

    from qsharp_jax import runs

    recipes = Path(__file__).parents[1] / "experiments" / "math"
    gsm8k, math = (config.as_json(config.load(runs.RunConfig, recipes / f"{model}_{data}.yaml"))
                   for data in ("gsm8k", "math"))
    differ = [d.split(" (")[0] for d in config.differences(gsm8k, math)]
    assert differ == ["algorithm.prompts_per_iteration", "math.train_file", "run_dir"]
    gsm8k, math = config.flatten(gsm8k), config.flatten(math)
    assert math["math.train_file"] == "data/math/math_train.jsonl" and math["algorithm.prompts_per_iteration"] == 6750
    assert gsm8k["algorithm.samples_per_prompt"] == 16 and gsm8k["algorithm.eta"] == 0.1  # the paper's settings
