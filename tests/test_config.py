"""Config: YAML + key=value overrides, every invalid field reported at once in one sentence each."""

import pytest

from decaf_lora.config import ConfigError, RunConfig, dump_config, field_help, load_config


def test_defaults_are_the_demo():
    cfg = load_config()
    assert (cfg.agents, cfg.topology.name, cfg.algorithm, cfg.task.model, cfg.task.dataset) == (
        8,
        "ring",
        "decaf",
        "minilm",
        "tweets",
    )
    assert cfg.partition.scheme != "iid"


def test_overrides_with_section_shortcuts_and_yaml_values():
    cfg = load_config(
        None,
        [
            "algorithm=dlora",
            "agents=16",
            "topology=torus",
            "rounds=20",
            "local_steps=5",
            "seed=1",
            "partition=dirichlet",
            "partition.alpha=0.1",
            "lora.rank=4",
            "lora.targets=[query,value]",
            "optim.lr=5e-3",
            "algorithm_options={}",
        ],
    )
    assert cfg.algorithm == "dlora" and cfg.agents == 16 and cfg.topology.name == "torus" and cfg.partition.alpha == 0.1
    assert cfg.lora.targets == ["query", "value"] and cfg.optim.lr == 5e-3


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "agents: 5\ntopology:\n  name: star\nlora: {rank: 2, alpha: 4}\nalgorithm_options: {split: balanced}\n"
    )
    cfg = load_config(str(f), ["agents=6"])
    assert (
        cfg.agents == 6
        and cfg.topology.name == "star"
        and cfg.lora.rank == 2
        and cfg.algorithm_options == {"split": "balanced"}
    )


def test_every_problem_is_reported_at_once_one_sentence_each():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "lora.rnk=3",
                "agents=0",
                "algorithm=decaff",
                "rounds=abc",
                "topology=moon",
                "optim.lr=-1",
                "lora.dropout=1.5",
                "partition=zipf",
            ],
        )
    problems = info.value.problems
    expected = [
        "unknown field 'lora.rnk'; did you mean 'lora.rank'?",
        "rounds='abc' has the wrong type; it must be an integer.",
        "agents=0 is too small; use a value in [1, 4096].",
        "algorithm='decaff' is not known; choose one of: ",
        "topology.name='moon' is not known",
        "optim.lr=-1.0 is too small; use a value > 0.",
        "lora.dropout=1.5 is too large; use a value in [0, 1).",
        "partition.scheme='zipf' is not known; choose one of: dirichlet, iid, natural, round-robin, shards.",
    ]
    assert len(problems) == len(expected)
    for want in expected:
        assert any(want in p for p in problems), want
    assert all(p.endswith((".", "?")) and "\n" not in p for p in problems)


@pytest.mark.parametrize(
    "override, message",
    [
        ("agents", "is not of the form key=value"),
        (
            "algorithm_options={split: half}",
            "algorithm_options.split='half' is not known; choose one of: all-into-b, balanced",
        ),
        ("device=tpu", "device='tpu' is not known; use cpu, cuda, cuda:N or auto."),
        (
            "optim.state_after_mix=sometimes",
            "optim.state_after_mix='sometimes' is not known; choose one of: keep, reset.",
        ),
        ("task.kind=speech", "task.kind='speech' is not known; choose one of: causal-lm, clip, module, text."),
        ("topology.link_drop=1", "topology.link_drop=1.0 is too large; use a value in [0, 1)."),
        ("partition=natural", "partition.scheme=natural needs partition.key"),
        ("lora.targets=7", "lora.targets=7 has the wrong type; it must be a list."),
    ],
)
def test_single_field_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert any(message in p for p in info.value.problems), info.value.problems


def test_options_of_another_algorithm_are_refused():
    with pytest.raises(ConfigError, match="algorithm 'dlora' has no option split; its options are: none."):
        load_config(None, ["algorithm=dlora", "algorithm_options={split: balanced}"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(listy))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["agents=3", "lora.targets=[a,b]", "topology.params={hubs: 1}"])
    f = tmp_path / "r.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(str(f)).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "word", ["1e3", "yes", "no", "on", "0x1F", "0o17", "010", "1_000", "true", ".inf", "null", "~"]
)
def test_strings_that_look_like_other_types_stay_strings_through_config_yaml(tmp_path, word):
    """config.yaml is read back by resume, export and report (and by a user's own YAML 1.1 tools): a name or a label
    that a reader could take for a number or a boolean is quoted when written."""
    import yaml

    cfg = load_config({"name": f"n{word}", "task": {"label_names": [word, "b"]}})
    text = dump_config(cfg)
    f = tmp_path / "r.yaml"
    f.write_text(text)
    assert load_config(str(f)).to_dict() == cfg.to_dict()
    assert yaml.safe_load(text)["task"]["label_names"] == [word, "b"]


@pytest.mark.parametrize(
    "text, value",
    [
        ("[no, yes, on, off]", ["no", "yes", "on", "off"]),
        ("[true, False]", [True, False]),
        ("[010, 0x1F, 0o17]", [10, 31, 15]),
    ],
)
def test_yaml_plain_scalars_follow_yaml_1_2_core(text, value):
    from decaf_lora.config import read_yaml

    assert read_yaml(f"v: {text}")["v"] == value


def test_every_field_has_help_text():
    rows = field_help()
    assert len(rows) > 30
    assert all(help_text for _, help_text, _ in rows)
    assert {name for name, _, _ in rows} >= {
        "agents",
        "lora.rank",
        "partition.alpha",
        "optim.state_after_mix",
        "task.model",
    }
    assert isinstance(RunConfig().lora.targets, list)
