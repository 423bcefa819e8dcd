"""Config loading, overrides, validation messages and the resolved-config round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from runtime.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, to_toml

# the training configs; scaling sweeps ([sweep] files, tests/test_scaling.py) are another format
CONFIGS = [
    p
    for p in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))
    if "sweep" not in tomllib.loads(p.read_text())
]
assert len(CONFIGS) >= 3, CONFIGS


def test_defaults_are_valid():
    Config().validate()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_presets_load_and_round_trip(path, tmp_path):
    config = load_config(path)
    written = tmp_path / "config.toml"
    written.write_text(to_toml(config))
    assert load_config(written) == config


def test_round_trip_of_every_kind_of_value(tmp_path):
    config = load_config(
        None,
        [
            "--name=x",
            "--train.lr=0.5",
            "--model.tie_embeddings=false",
            'data.path="a \\"quoted\\" path"',
            "--data.source=jsonl",
        ],
    )
    written = tmp_path / "c.toml"
    written.write_text(to_toml(config))
    assert load_config(written) == config
    assert config.data.path == 'a "quoted" path'


def test_overrides_take_precedence_over_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nsteps = 7\nlr = 0.01\n[planner]\nmode = "static"\n')
    config = load_config(path, ["--train.steps=3", "--planner.static_degree=4", "--model.d_model=64"])
    assert (config.train.steps, config.train.lr, config.planner.mode) == (3, 0.01, "static")
    assert (config.planner.static_degree, config.model.d_model) == (4, 64)


def test_override_values_are_typed():
    data = apply_overrides({}, ["--a.i=3", "--a.f=1e-3", "--a.b=true", "--a.s=flexsp", '--a.q="3"', "--a.l=[1,2]"])
    assert data == {"a": {"i": 3, "f": 1e-3, "b": True, "s": "flexsp", "q": "3", "l": [1, 2]}}


def test_int_given_to_float_field_is_accepted():
    assert load_config(None, ["--train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "overrides,field,fragment",
    [
        (["--model.num_heads=0"], "model.num_heads", "positive integer"),
        (["--model.d_model=130"], "model.d_model", "divisible by model.num_heads"),
        (["--model.num_kv_heads=3"], "model.num_kv_heads", "must divide"),
        (["--model.layer_pattern=LLX"], "model.layer_pattern", "L (linear) and S (softmax)"),
        (["--model.ffn=sparse"], "model.ffn", "allowed: 'dense', 'moe'"),
        (["--model.d_model=abc"], "model.d_model", "expected an integer"),
        (["--model.d_model=1.5"], "model.d_model", "expected an integer"),
        (["--model.tie_embeddings=1"], "model.tie_embeddings", "expected true or false"),
        (["--train.lr=0"], "train.lr", "must be > 0"),
        (["--train.min_lr=1.0"], "train.min_lr", "must be in [0, train.lr"),
        (["--train.zero_stage=3"], "train.zero_stage", "allowed: 0, 1, 2"),
        (["--train.steps=-1"], "train.steps", "positive integer"),
        (["--moe.top_k=9"], "moe.top_k", "<= moe.num_experts=8"),
        (["--moe.ep_size=3"], "moe.ep_size", "must divide moe.num_experts"),
        (["--moe.chain_iterations=3"], "moe.chain_iterations", "must divide moe.top_k"),
        (["--moe.router=rnn"], "moe.router", "allowed: 'linear', 'gru'"),
        (["--planner.static_degree=3"], "planner.static_degree", "power of two"),
        (["--planner.mode=adaptive"], "planner.mode", "'flexsp', 'static', 'batch_adaptive'"),
        (["--data.source=jsonl"], "data.path", "needs a path"),
        (["--data.validation_fraction=1.0"], "data.validation_fraction", "[0, 1)"),
        (["--parallel.device=tpu"], "parallel.device", "allowed: 'auto', 'cpu'"),
        (["--parallel.backend=mpi"], "parallel.backend", "allowed: 'auto', 'nccl', 'gloo'"),
        (["--name=a/b"], "name", "without slashes"),
        (["--moe.ep_size=4", "--launch.nproc_per_node=2"], "moe.ep_size", "must not exceed the number of ranks"),
    ],
)
def test_bad_values_name_the_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert f"`{field}`" in message and fragment in message, message


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (
            ["--model.num_layer=3"],
            "unknown config key `model.num_layer` in section `model`; did you mean `model.num_layers`?",
        ),
        (["--trian.steps=3"], "unknown config key `trian`"),
        (["--trian.steps=3"], "did you mean `train`?"),
        (["--model=3"], "`model` is a section"),
        (["--train.steps.x=3"], "`train.steps` is a value, not a section"),
        (["--train.steps"], "not of the form --section.key=value"),
    ],
)
def test_unknown_keys_suggest_the_closest_name(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[modle]\nd_model = 3\n")
    with pytest.raises(ConfigError, match="did you mean `model`"):
        load_config(unknown)


def test_run_dir_uses_the_name():
    assert str(config_from_dict({"name": "abc"}).resolved_run_dir) == "runs/abc"


def test_a_bad_cost_model_is_one_config_error_naming_the_field():
    from runtime.train import resolve_cost_model

    config = load_config(None, ["--planner.cost_model=tiny-cpuu"])
    with pytest.raises(ConfigError, match=r"`planner.cost_model`.*did you mean 'tiny-cpu'"):
        resolve_cost_model(config, 2)


def _imported_packages(package: str) -> set[str]:
    """Top-level packages that the modules of ``package`` import (statically, anywhere in the file)."""
    import ast
    from pathlib import Path

    found = set()
    for path in (Path(__file__).resolve().parents[1] / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
    return found


@pytest.mark.parametrize("package", ["parallel", "moe", "planner", "launchers"])
def test_components_below_the_runtime_do_not_import_it(package):
    assert "runtime" not in _imported_packages(package)


def test_every_section_is_owned_by_its_component_and_re_exported():
    import launchers.config
    import moe.config
    import parallel.config
    import planner.config
    import runtime.config

    assert runtime.config.LaunchConfig is launchers.config.LaunchConfig
    assert runtime.config.MoEConfig is moe.config.MoEConfig
    assert runtime.config.ParallelConfig is parallel.config.ParallelConfig
    assert runtime.config.PlannerConfig is planner.config.PlannerConfig
