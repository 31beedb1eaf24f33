import copy
import math

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftctl.core.config import (
    SCHEDULES,
    Config,
    ConfigError,
    LRSchedule,
    config_sha256,
    config_to_dict,
    decode_config,
    default_config_dict,
    describe_keys,
    keep_last,
    merge_overrides,
)

BASE = {"model": "models/tiny"}


def cfg(**over):
    return {**BASE, **over}


def error(data, source="ftctl.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        decode_config(data, source=source)
    return info.value


# --- decoding: the happy path -----------------------------------------------------------------


def test_minimal_config_gets_defaults_and_no_warnings():
    c, warnings = decode_config(BASE)
    assert c == Config(model="models/tiny")
    assert c.lora_parameters.rank == 8 and keep_last(c) == 3 and c.retention.keep_last is None
    assert c.timeouts.eval_hang_s == 1800 and c.consolidation.schedule is None
    assert warnings == []


def test_full_mlx_lm_style_config_decodes():
    data = cfg(
        fine_tune_type="dora",
        optimizer="adamw",
        optimizer_config={"adamw": {"weight_decay": 0.01}},
        learning_rate=2e-5,
        lr_schedule={
            "name": "cosine_decay",
            "warmup": 10,
            "warmup_init": 1e-7,
            "arguments": [2e-5, 1000, 1e-7],
        },
        lora_parameters={
            "rank": 16,
            "scale": 10.0,
            "dropout": 0.05,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
        num_layers=-1,
        val_batches=-1,
        grad_accumulation_steps=4,
        save_every=100,
        steps_per_eval=200,
        consolidation={"schedule": "03:00", "keep_models": 1},
    )
    c, warnings = decode_config(data)
    assert c.lr_schedule == LRSchedule(
        name="cosine_decay", warmup=10, warmup_init=1e-7, arguments=[2e-5, 1000, 1e-7]
    )
    assert c.lora_parameters.keys == ["self_attn.q_proj", "self_attn.v_proj"]
    assert c.num_layers == -1 and c.consolidation.schedule == "03:00"
    assert warnings == []


def test_decode_does_not_modify_its_input():
    data = cfg(learning_rate="2e-4", lora_parameters={"rank": 4})
    before = copy.deepcopy(data)
    decode_config(data)
    assert data == before


def test_pyyaml_string_floats_are_read_as_numbers():
    # PyYAML (YAML 1.1) loads `learning_rate: 1e-5` as the string '1e-5'. (yaml.Loader, not
    # safe_load: importing mlx_lm.lora adds a float resolver to yaml.SafeLoader for the whole process.)
    data = yaml.load(
        "model: m\nlearning_rate: 1e-5\nlr_schedule:\n  name: cosine_decay\n"
        "  arguments: [1e-5, 100, 1e-7]\n",
        Loader=yaml.Loader,
    )
    assert data["learning_rate"] == "1e-5"
    c, _ = decode_config(data)
    assert c.learning_rate == 1e-5 and c.lr_schedule.arguments == [1e-5, 100, 1e-7]


def test_numeric_strings_are_not_coerced_where_an_int_or_str_goes():
    assert "has the wrong type: expected an integer >= 1" in str(error(cfg(iters="1e3")))
    assert decode_config(cfg(model="1e5"))[0].model == "1e5"


# --- ConfigError messages ---------------------------------------------------------------------


def test_out_of_range_message_and_attributes():
    e = error(cfg(lora_parameters={"rank": 0}))
    assert str(e) == (
        "ftctl.yaml: lora_parameters.rank = 0 is out of range: "
        "must be an integer between 1 and 1024"
    )
    assert (e.key, e.value, e.allowed) == (
        "lora_parameters.rank",
        0,
        "an integer between 1 and 1024",
    )
    assert isinstance(e, ValueError)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (cfg(batch_size=0), "batch_size = 0 is out of range: must be an integer >= 1"),
        (cfg(iters=0), "iters = 0 is out of range: must be an integer >= 1"),
        (cfg(learning_rate=0), "learning_rate = 0 is out of range: must be a number > 0"),
        (cfg(learning_rate=-1e-5), "learning_rate = -1e-05 is out of range"),
        (cfg(max_seq_length=1), "max_seq_length = 1 is out of range: must be an integer >= 2"),
        (cfg(seed=-1), "seed = -1 is out of range: must be an integer between 0 and 4294967295"),
        (cfg(lora_parameters={"rank": 2048}), "lora_parameters.rank = 2048 is out of range"),
        (
            cfg(lora_parameters={"dropout": 1.0}),
            "lora_parameters.dropout = 1.0 is out of range: must be a number >= 0 and < 1",
        ),
        (
            cfg(lora_parameters={"scale": 0}),
            "lora_parameters.scale = 0 is out of range: must be a number > 0",
        ),
        (
            cfg(retention={"keep_last": 0}),
            "retention.keep_last = 0 is out of range: must be an integer >= 1, or null",
        ),
        (cfg(restart={"max_restarts": -1}), "restart.max_restarts = -1 is out of range"),
        (cfg(timeouts={"hang_s": 0}), "timeouts.hang_s = 0 is out of range: must be a number > 0"),
        (cfg(min_free_disk_gb=-1), "min_free_disk_gb = -1 is out of range: must be a number >= 0"),
        (cfg(consolidation={"keep_models": 0}), "consolidation.keep_models = 0 is out of range"),
        (
            cfg(lr_schedule={"name": "cosine_decay", "warmup": -1, "arguments": [1e-5, 10]}),
            "lr_schedule.warmup = -1 is out of range: must be an integer >= 0",
        ),
        (cfg(grad_accumulation_steps=0), "grad_accumulation_steps = 0 is out of range"),
    ],
)
def test_range_violations(data, fragment):
    assert fragment in str(error(data))


@pytest.mark.parametrize("key", ["num_layers", "val_batches"])
def test_minus_one_means_all_but_zero_is_rejected(key):
    assert getattr(decode_config(cfg(**{key: -1}))[0], key) == -1
    e = error(cfg(**{key: 0}))
    assert f"{key} = 0 is out of range: must be -1 (" in str(e) and e.key == key
    assert f"{key} = -2 is out of range: must be -1 (" in str(error(cfg(**{key: -2})))


@pytest.mark.parametrize(
    "data, key",
    [
        (cfg(learning_rat=1e-5), "learning_rate"),
        (cfg(lora_parameters={"rnk": 4}), "lora_parameters.rank"),
        (cfg(retention={"keep_lst": 4}), "retention.keep_last"),
        (
            cfg(lr_schedule={"name": "cosine_decay", "arguments": [1e-5, 9], "warmpu": 3}),
            "lr_schedule.warmup",
        ),
        (cfg(optimizer_config={"adamww": {}}), "optimizer_config.adamw"),
    ],
)
def test_unknown_key_suggests_the_closest(data, key):
    e = error(data)
    typo = e.key
    assert str(e) == f"ftctl.yaml: unknown key {typo!r} (did you mean {key!r}?)"


def test_unknown_key_without_close_match_lists_known_keys():
    e = error(cfg(zzz=1))
    assert "unknown key 'zzz' (known keys: model, fine_tune_type," in str(e)
    assert "unknown key 'timeouts.qq' (known keys in timeouts: hang_s, eval_hang_s, stop_s)" in str(
        error(cfg(timeouts={"qq": 1}))
    )


def test_every_key_of_the_installed_mlx_lm_decodes_with_its_default():
    """ftctl.yaml takes mlx_lm.lora's whole config (CONFIG_DEFAULTS read from the installed mlx-lm,
    plus the -c-only keys), so one file serves both tools; MLX_LM_DEFAULTS is that dict."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    from ftctl.core.config import MLX_LM_DEFAULTS

    assert MLX_LM_DEFAULTS == CONFIG_DEFAULTS  # an mlx-lm upgrade that changes them fails here
    full = {
        **CONFIG_DEFAULTS,
        "train": True,
        "data": None,
        "hf_dataset": [{"path": "org/set", "test_split": "test", "config": {"name": "x"}}],
        "lr_schedule": {"name": "cosine_decay", "arguments": [1e-5, 100, 1e-7], "warmup": 2},
    }
    c, warnings = decode_config(full)
    assert warnings == []  # mlx-lm's optimizer_config lists every optimizer, empty: nothing ignored
    assert c.adapter_path == "adapters" and c.test_batches == 500 and c.clear_cache_threshold == 0
    assert c.hf_dataset[0].valid_split == "train[-10%:]" and c.hf_dataset[0].config == {"name": "x"}
    assert decode_config(cfg(prompt_feature="question", chat_feature="conv"))[0].prompt_feature == (
        "question"
    )


@pytest.mark.parametrize(
    "data, fragment",
    [
        (cfg(config="other.yaml"), "config = 'other.yaml' is not followed"),
        (cfg(report_to="tensorboard"), "report_to = 'tensorboard' names an unknown tracker"),
        (cfg(test_batches=0), "test_batches = 0 is out of range"),
        (cfg(data="d", hf_dataset={"path": "p"}), "data = 'd' is given beside hf_dataset"),
        (
            cfg(hf_dataset={"path": "p"}, text_feature="t"),
            "text_feature = 't' is not read with hf_dataset",
        ),
        (cfg(hf_dataset=[]), "hf_dataset = [] is empty"),
        (cfg(hf_dataset={"path": "p", "splitt": "x"}), "unknown key 'hf_dataset.splitt'"),
        (cfg(prompt_feature=""), "prompt_feature = '' is"),
    ],
)
def test_mlx_lm_keys_are_checked(data, fragment):
    assert fragment in str(error(data))


@pytest.mark.parametrize(
    "data, fragment",
    [
        (
            cfg(batch_size="four"),
            "batch_size = 'four' has the wrong type: expected an integer >= 1",
        ),
        (cfg(batch_size=4.0), "batch_size = 4.0 has the wrong type: expected an integer"),
        (cfg(batch_size=True), "batch_size = true has the wrong type"),
        (
            cfg(learning_rate="fast"),
            "learning_rate = 'fast' has the wrong type: expected a number > 0",
        ),
        (cfg(mask_prompt="yes"), "mask_prompt = 'yes' has the wrong type: expected true or false"),
        (cfg(model=5), "model = 5 has the wrong type: expected a non-empty path"),
        (
            cfg(lora_parameters=5),
            "lora_parameters = 5 has the wrong type: expected a mapping with keys",
        ),
        (cfg(lora_parameters=[1]), "lora_parameters = [1] has the wrong type"),
        (cfg(retention=None), "retention = null has the wrong type"),
        (
            cfg(lora_parameters={"keys": "q_proj"}),
            "lora_parameters.keys = 'q_proj' has the wrong type",
        ),
        (
            cfg(lora_parameters={"keys": [1]}),
            "lora_parameters.keys[0] = 1 has the wrong type: expected a string",
        ),
        (
            cfg(lr_schedule={"name": "cosine_decay", "arguments": [1e-5, "x"]}),
            "lr_schedule.arguments[1] = 'x' has the wrong type: expected a number",
        ),
        (
            cfg(lr_schedule=3),
            "lr_schedule = 3 has the wrong type: expected a mapping with keys name, "
            "warmup, warmup_init, arguments or null",
        ),
        (cfg(optimizer_config={"adamw": 5}), "optimizer_config = {'adamw': 5} has the wrong type"),
        (cfg(optimizer_config=[]), "optimizer_config = [] has the wrong type"),
    ],
)
def test_wrong_types_name_the_expected_type(data, fragment):
    assert fragment in str(error(data))


@pytest.mark.parametrize(
    "data, fragment",
    [
        (
            cfg(fine_tune_type="fuul"),
            "fine_tune_type = 'fuul' is not allowed: must be one of 'dora', 'full', 'lora'",
        ),
        (cfg(result="worst"), "result = 'worst' is not allowed: must be one of 'best', 'last'"),
        (cfg(optimizer="adamax"), "optimizer = 'adamax' is not allowed: must be one of"),
        (
            cfg(lr_schedule={"name": "cosine", "arguments": [1e-5, 10]}),
            "lr_schedule.name = 'cosine' is not allowed: must be one of 'cosine_decay'",
        ),
        (
            cfg(consolidation={"schedule": "3am"}),
            "consolidation.schedule = '3am' is not valid: must be a time 'HH:MM' (24-hour, local), or null",
        ),
        (cfg(consolidation={"schedule": "24:00"}), "consolidation.schedule = '24:00' is not valid"),
        (
            cfg(lora_parameters={"keys": []}),
            "lora_parameters.keys = [] is not valid: must be a non-empty list of module names, or null",
        ),
        (cfg(model=""), "model = '' is not valid: must be a non-empty path"),
    ],
)
def test_disallowed_values(data, fragment):
    assert fragment in str(error(data))


def test_missing_required_keys():
    e = error({})
    assert (
        str(e)
        == "ftctl.yaml: missing required key 'model' (an mlx-lm model folder, a Hugging Face repo id or a .gguf file)"
    )
    assert e.key == "model"
    e = error(cfg(lr_schedule={"arguments": [1e-5, 10]}))
    assert "missing required key 'lr_schedule.name'" in str(e) and e.key == "lr_schedule.name"


@pytest.mark.parametrize("data, kind", [(None, "empty"), ([1, 2], "a list"), ("model: x", "a str")])
def test_top_level_must_be_a_mapping(data, kind):
    assert (
        f"the file must be a mapping of keys to values (model: ..., iters: ...), but it is {kind}"
        in str(error(data))
    )


def test_non_string_keys():
    assert "key 3 in the top level is not a name" in str(error({**BASE, 3: 4}))
    assert "key null in lora_parameters is not a name" in str(error(cfg(lora_parameters={None: 1})))
    assert "optimizer_config has a key that is not a string" in str(
        error(cfg(optimizer_config={"adamw": {1: 2}}))
    )


@pytest.mark.parametrize(
    "data, key",
    [
        (cfg(learning_rate=math.inf), "learning_rate"),
        (cfg(learning_rate=math.nan), "learning_rate"),
        (cfg(timeouts={"hang_s": math.inf, "eval_hang_s": math.inf}), "timeouts.hang_s"),
        (cfg(optimizer_config={"adamw": {"eps": math.nan}}), "optimizer_config.adamw.eps"),
    ],
)
def test_non_finite_numbers_are_rejected(data, key):
    e = error(data)
    assert e.key == key and (
        " is not allowed: must be a finite number" in str(e) or " is out of range" in str(e)
    )


def test_source_names_the_file():
    assert str(error(cfg(iters=0), source="jobs/a/ftctl.yaml")).startswith(
        "jobs/a/ftctl.yaml: iters = 0"
    )


def test_messages_are_one_line():
    e = error(cfg(model="a\nb", iters="x\ny"))
    assert "\n" not in str(e)


# --- cross-field rules --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["save_every", "steps_per_eval"])
def test_checkpoints_and_evals_fall_on_optimizer_updates(key):
    e = error({**cfg(grad_accumulation_steps=4, save_every=100, steps_per_eval=200), key: 10})
    assert str(e) == (
        f"ftctl.yaml: {key} = 10 must be a multiple of grad_accumulation_steps = 4 "
        "(checkpoints and evaluations fall on optimizer updates)"
    )
    assert e.key == key and e.value == 10


def test_eval_hang_must_not_be_shorter_than_hang():
    e = error(cfg(timeouts={"hang_s": 600, "eval_hang_s": 300}))
    assert "timeouts.eval_hang_s = 300.0 is too small: must be >= timeouts.hang_s = 600" in str(e)
    decode_config(cfg(timeouts={"hang_s": 600, "eval_hang_s": 600}))


def test_backoff_max_must_not_be_shorter_than_backoff():
    e = error(cfg(restart={"backoff_s": 120}))
    assert "restart.backoff_max_s = 60.0 is too small: must be >= restart.backoff_s = 120" in str(e)


@pytest.mark.parametrize(
    "name, arguments, fragment",
    [
        ("cosine_decay", [], "must be 2 to 3 numbers for cosine_decay(init, decay_steps[, end])"),
        ("cosine_decay", [1e-5], "does not fit the schedule"),
        ("cosine_decay", [1e-5, 10, 0, 1], "does not fit the schedule"),
        (
            "exponential_decay",
            [1e-5, 0.9, 3],
            "must be 2 numbers for exponential_decay(init, decay_rate)",
        ),
        ("linear_schedule", [1e-5, 0.0], "must be 3 numbers for linear_schedule(init, end, steps)"),
        (
            "step_decay",
            [1e-5, 0.5],
            "must be 3 numbers for step_decay(init, decay_rate, step_size)",
        ),
    ],
)
def test_schedule_arguments_must_fit_the_scheduler(name, arguments, fragment):
    e = error(cfg(lr_schedule={"name": name, "arguments": arguments}))
    assert fragment in str(e) and e.key == "lr_schedule.arguments"


def test_schedule_initial_lr_and_step_counts():
    e = error(cfg(lr_schedule={"name": "cosine_decay", "arguments": [0, 100]}))
    assert (
        "lr_schedule.arguments[0] = 0 is out of range: must be > 0 (the initial learning rate)"
        in str(e)
    )
    e = error(cfg(lr_schedule={"name": "linear_schedule", "arguments": [1e-5, 0.0, 0]}))
    assert (
        "lr_schedule.arguments[2] = 0 is out of range: must be >= 1 (steps is a step count)"
        in str(e)
    )
    e = error(cfg(lr_schedule={"name": "cosine_decay", "arguments": [1e-5, 0.5]}))
    assert "(decay_steps is a step count)" in str(e)


def test_schedule_table_matches_the_schema_and_mlx():
    import mlx.optimizers as optim

    assert set(SCHEDULES) == set(msgspec.inspect.type_info(LRSchedule).fields[0].type.type.values)
    for name, (_, lo, hi, _) in SCHEDULES.items():
        fn = getattr(optim.schedulers, name)
        args = [1e-4, 0.5, 10][:lo] if name != "cosine_decay" else [1e-4, 10]
        fn(*args)  # the minimal argument list is callable
        if hi > lo:
            fn(*args, 0.0)


def test_schedule_built_by_mlx_lm_from_a_decoded_config():
    from mlx_lm.tuner.utils import build_schedule

    c, _ = decode_config(
        cfg(
            lr_schedule={
                "name": "cosine_decay",
                "warmup": 5,
                "warmup_init": 0.0,
                "arguments": ["1e-5", 100, 1e-7],
            }
        )
    )
    schedule = build_schedule(config_to_dict(c)["lr_schedule"])
    assert abs(float(schedule(5)) - 1e-5) < 1e-9


def test_optimizer_settings_must_be_plain_values():
    c, _ = decode_config(
        cfg(
            optimizer="adamw",
            optimizer_config={"adamw": {"betas": [0.9, 0.99], "bias_correction": True}},
        )
    )
    assert c.optimizer_config == {"adamw": {"betas": [0.9, 0.99], "bias_correction": True}}
    e = error(cfg(optimizer="adamw", optimizer_config={"adamw": {"betas": {"a": 1}}}))
    assert (
        "optimizer_config.adamw.betas = {'a': 1} is not valid: must be a number, string, "
        "boolean, null or a list of them"
    ) in str(e)
    assert e.key == "optimizer_config.adamw.betas"


def test_optimizer_config_for_another_optimizer_is_a_warning():
    _, warnings = decode_config(
        cfg(optimizer="adam", optimizer_config={"adamw": {"weight_decay": 0.1}})
    )
    assert warnings == ["optimizer_config.adamw is ignored: optimizer is 'adam'"]


# --- warnings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, fragment",
    [
        (cfg(learning_rate=0.01), "learning_rate = 0.01 is high for LoRA"),
        (
            cfg(
                lr_schedule={"name": "cosine_decay", "arguments": [0.01, 1000]}, learning_rate=0.01
            ),
            "lr_schedule.arguments[0] = 0.01 is high for LoRA",
        ),
        (
            cfg(iters=100, steps_per_eval=200, save_every=50),
            "steps_per_eval = 200 > iters = 100: validation would never run during training and "
            "val_loss would stay empty",
        ),
        (
            cfg(iters=100, steps_per_eval=50, save_every=200),
            "save_every = 200 > iters = 100: only the final checkpoint will be written",
        ),
        (
            cfg(iters=5, steps_per_eval=5, save_every=5),
            "iters = 5 < steps_per_report = 10: the training loss is reported only at the final step",
        ),
        (cfg(lora_parameters={"dropout": 0.6}), "lora_parameters.dropout = 0.6 is above 0.5"),
        (cfg(batch_size=128), "batch_size = 128 is above 64"),
        (cfg(max_seq_length=65536), "max_seq_length = 65536 is above 32768"),
        (
            cfg(lr_schedule={"name": "cosine_decay", "arguments": [2e-5, 1000]}),
            "learning_rate = 1e-05 is ignored: the schedule starts from lr_schedule.arguments[0] = 2e-05",
        ),
        (
            cfg(
                iters=100,
                steps_per_eval=100,
                save_every=100,
                lr_schedule={"name": "cosine_decay", "warmup": 100, "arguments": [1e-5, 100]},
            ),
            "lr_schedule.warmup = 100 >= iters = 100",
        ),
    ],
)
def test_suspicious_but_legal_values_warn(data, fragment):
    _, warnings = decode_config(data)
    assert any(fragment in w for w in warnings), warnings


def test_defaults_do_not_warn_and_bounds_are_exclusive():
    assert (
        decode_config(
            cfg(
                learning_rate=1e-3,
                batch_size=64,
                max_seq_length=32768,
                lora_parameters={"dropout": 0.5},
            )
        )[1]
        == []
    )


# --- overrides ----------------------------------------------------------------------------------


def test_merge_overrides_parses_yaml_scalars_and_copies():
    base = {"model": "m", "lora_parameters": {"rank": 8}, "lr_schedule": None}
    out = merge_overrides(
        base,
        [
            "learning_rate=2e-4",
            "lora_parameters.rank=16",
            "lr_schedule.name=cosine_decay",
            "lr_schedule.arguments=[2.0e-4, 100]",
            "retention.keep_last=5",
            "mask_prompt=true",
            "consolidation.schedule=null",
            " batch_size = 2 ",
        ],
    )
    assert base == {"model": "m", "lora_parameters": {"rank": 8}, "lr_schedule": None}
    assert out["lora_parameters"] == {"rank": 16} and out["retention"] == {"keep_last": 5}
    assert out["lr_schedule"] == {"name": "cosine_decay", "arguments": [2e-4, 100]}
    assert out["mask_prompt"] is True and out["consolidation"] == {"schedule": None}
    assert out["batch_size"] == 2
    c, _ = decode_config(out)
    assert c.learning_rate == 2e-4 and c.lora_parameters.rank == 16 and c.retention.keep_last == 5


def test_merge_overrides_later_wins_and_value_may_contain_equals():
    out = merge_overrides(BASE, ["iters=10", "iters=20", "model=runs/a=b"])
    assert out["iters"] == 20 and out["model"] == "runs/a=b"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("learning_rate", "override 'learning_rate' is not key=value"),
        ("=3", "is not key=value"),
        ("lora parameters.rank=3", "is not key=value"),
        ("a..b=3", "is not key=value"),
        ("iters=[1, 2", "override iters: cannot read '[1, 2' as a YAML value"),
        ("model.path=x", "override model.path: model = 'models/tiny' is not a mapping"),
    ],
)
def test_merge_overrides_bad_syntax(override, fragment):
    with pytest.raises(ConfigError) as info:
        merge_overrides(BASE, [override])
    assert fragment in str(info.value)


def test_merge_overrides_rejects_non_strings():
    with pytest.raises(ConfigError):
        merge_overrides(BASE, [3])
    with pytest.raises(ConfigError):
        merge_overrides([], ["a=1"])


# --- serialization and help ---------------------------------------------------------------------


def test_round_trip_and_hash():
    c, _ = decode_config(cfg(lora_parameters={"rank": 4}, learning_rate=1))
    d = config_to_dict(c)
    assert isinstance(d["learning_rate"], float)
    assert decode_config(d)[0] == c
    assert config_sha256(c) == config_sha256(decode_config(dict(reversed(list(d.items()))))[0])
    assert config_sha256(c) != config_sha256(decode_config(cfg(lora_parameters={"rank": 5}))[0])
    assert len(config_sha256(c)) == 64


def test_default_config_dict_is_complete_and_valid():
    d = default_config_dict("models/tiny")
    assert d["model"] == "models/tiny" and d["lr_schedule"] is None
    assert d["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": None}
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert decode_config(d) == (Config(model="models/tiny"), [])


def _dotted_keys(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        yield key
        if isinstance(v, dict) and k != "optimizer_config":
            yield from _dotted_keys(v, key)


def test_describe_keys_covers_every_key():
    help_ = describe_keys()
    expected = set(_dotted_keys(default_config_dict("m")))
    expected |= {
        "lr_schedule.name",
        "lr_schedule.warmup",
        "lr_schedule.warmup_init",
        "lr_schedule.arguments",
    }
    expected |= {
        f"notify[].{k}"
        for k in ("url", "command", "events", "format", "timeout_s", "retries", "backoff_s")
    }
    expected |= {
        f"distributed.{k}"
        for k in ("backend", "hosts", "hostfile", "processes_per_host", "controller")
    }
    expected |= {"early_stopping.patience", "early_stopping.min_delta"}
    expected |= {
        f"hf_dataset.{k}"
        for k in ("path", "train_split", "valid_split", "test_split", "config")
        + ("prompt_feature", "completion_feature", "text_feature", "chat_feature")
        + ("chosen_feature", "rejected_feature", "system_feature")
    }
    assert set(help_) == expected
    assert all(line and "\n" not in line for line in help_.values())
    assert help_["lora_parameters.rank"].endswith("(an integer between 1 and 1024; default 8)")
    assert help_["model"].endswith("required)")


# --- fuzz: decode_config raises ConfigError and nothing else ------------------------------------

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4)
    ),
    max_leaves=20,
)

VALID = {
    "model": "m",
    "optimizer": "adamw",
    "optimizer_config": {"adamw": {"weight_decay": 0.01}},
    "lr_schedule": {"name": "cosine_decay", "warmup": 2, "arguments": [1e-5, 100, 0.0]},
    "lora_parameters": {"rank": 8, "keys": ["q_proj"]},
    "retention": {"keep_last": 2},
    "restart": {"max_restarts": 1},
    "timeouts": {"hang_s": 10.0},
    "consolidation": {"schedule": "03:00"},
    "iters": 100,
    "save_every": 10,
    "steps_per_eval": 10,
}


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


PATHS = list(_paths(VALID)) + [
    ("lora_parameters", "dropout"),
    ("grad_accumulation_steps",),
    ("lr_schedule", "arguments"),
    ("num_layers",),
    ("seed",),
]


@st.composite
def mutated_config(draw):
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        node = data
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        if draw(st.booleans()):
            node[path[-1]] = draw(json_like)
        else:
            node.pop(path[-1], None)
    return data


def _walk_agrees_with_msgspec(data) -> None:
    """The errors come from the schema (core/config_errors.py), not from msgspec's English: the walk
    rejects exactly what msgspec.convert rejects, so msgspec's own message is never what a user reads."""
    import msgspec

    from ftctl.core import config_errors as E
    from ftctl.core.config import config_type

    try:
        prepared = E.prepare(data, config_type(), "", "ftctl.yaml")
    except ConfigError:
        return
    walk = E.check(prepared, config_type(), "", "ftctl.yaml")
    try:
        msgspec.convert(prepared, Config)
    except msgspec.ValidationError as e:
        assert walk is not None, f"msgspec found what the walk did not: {e}"
    else:
        assert walk is None, walk


def _only_config_errors(data):
    _walk_agrees_with_msgspec(data)
    try:
        c, warnings = decode_config(data)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        assert "cannot read the config" not in str(e), str(e)  # no internal fallback reached
        return
    assert isinstance(c, Config) and all(isinstance(w, str) for w in warnings)
    config_sha256(c)
    assert decode_config(config_to_dict(c))[0] == c


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like)
def test_fuzz_arbitrary_values(data):
    _only_config_errors(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(list(VALID) + ["learning_rate", "x"]) | st.text(max_size=5),
        json_like,
        max_size=5,
    )
)
def test_fuzz_arbitrary_top_level_dicts(data):
    _only_config_errors({"model": "m", **data})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_config())
def test_fuzz_mutations_of_a_valid_config(data):
    _only_config_errors(data)
