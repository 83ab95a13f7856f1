"""TrainConfig: the parameter schema, reading and writing the reference's settings JSON,
validation messages, the 2nd pass, --set overrides and the check-config command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import choices as C
from trainer.cli import main as cli_main
from trainer.config import (
    OPTIMIZER_ALIASES, PARAMS, ConfigError, TrainConfig, param, params_for_mode, parse_step_rules,
)
from trainer.config.values import to_typed

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "presets"

# SPEC.md §3.1, typed here independently of the schema: the 59 keys in saved order.
REFERENCE_KEYS = """network_type network_rank network_alpha lora_data_directory diff_target_name
lora_trigger_word image_size(height,_width) train_iterations train_batch_size train_learning_rate
train_optimizer train_optimizer_settings train_lr_scheduler train_lr_scheduler_settings save_lora_name
use_gradient_checkpointing network_blocks(BASE_=_TextEncoder) network_resume network_strength
network_conv_rank network_conv_alpha network_element network_train_text_encoder image_buckets_step
image_num_multiply image_min_length image_max_ratio sub_image_num image_mirroring image_use_filename_as_tag
image_disable_upscale train_fixed_timsteps_in_batch train_textencoder_learning_rate train_seed
train_min_timesteps train_max_timesteps train_loss_function train_lr_step_rules train_lr_warmup_steps
train_lr_scheduler_num_cycles train_lr_scheduler_power train_snr_gamma save_per_steps diff_alt_ratio
diff_revert_original_target diff_use_diff_mask train_model_precision train_lora_precision save_precision
train_VAE_precision diff_load_1st_pass diff_save_1st_pass diff_1st_pass_only logging_save_csv
logging_verbose save_overwrite save_as_json model_v_pred use_2nd_pass_settings"""
REFERENCE_KEYS = [k.replace(",_", ", ").replace("_=_", " = ") for k in REFERENCE_KEYS.split()]
EXTENSION_NAMES = ["gradient_accumulation_steps", "train_noise_offset", "train_max_grad_norm",
                   "cache_latents_to_disk", "addift_timestep_schedule", "zero_terminal_snr", "ileco_latents",
                   "clip_skip", "embeddings_dir", "preview_prompts", "preview_every_steps", "preview_seed",
                   "preview_size", "preview_steps", "host_check",
                   "memory_profile", "compile_unet"]
SHIPPED = ["LoRA", "iLECO", "Difference", "Difference_Use2ndPass", "ADDifT_Action_SD1.5", "ADDifT_Action_XL",
           "ADDifT_Style_SD1.5", "ADDifT_Style_XL", "Multi-ADDifT"]


def _reference_files() -> list[Path]:
    from conftest import REFERENCE_PRESETS

    return sorted(REFERENCE_PRESETS.glob("*.json")) if REFERENCE_PRESETS.is_dir() else []


# --- schema ------------------------------------------------------------------------------

def test_schema_order_names_and_groups():
    assert [p.key for p in PARAMS[:59]] == REFERENCE_KEYS
    assert all(p.reference for p in PARAMS[:59]) and not any(p.reference for p in PARAMS[59:])
    assert [p.name for p in PARAMS[59:]] == EXTENSION_NAMES
    assert param("image_size(height, width)").name == "image_size"
    assert param("network_blocks").key == "network_blocks(BASE = TextEncoder)"
    assert [p.group for p in PARAMS].count("required") == 17 and PARAMS[16].group == "required"
    assert len({p.name for p in PARAMS}) == len(PARAMS)


def test_schema_entries_are_consistent():
    for p in PARAMS:
        assert p.help.strip() and p.kind and p.ui in ("DD", "TX", "CH", "CB"), p.key
        assert p.modes <= {"L", "I", "D", "A", "M", "D2"}, p.key
        assert p.second_pass == ("D2" in p.modes), p.key
        default = list(p.default) if p.kind == "blocks" else p.default
        assert to_typed(p, default) == default, p.key  # every default passes its own check
        if p.kind == "choice":
            assert p.default in p.choices
    panel = {p.key for p in PARAMS if p.reference and p.second_pass}
    assert {"network_type", "train_learning_rate", "network_strength", "train_fixed_timsteps_in_batch",
            "model_v_pred", "use_2nd_pass_settings"} <= panel
    assert not panel & {"save_lora_name", "lora_data_directory", "image_buckets_step", "diff_alt_ratio",
                        "diff_load_1st_pass", "logging_save_csv", "train_textencoder_learning_rate"}


def test_params_for_mode_and_optimizer_aliases():
    lora = {p.name for p in params_for_mode("LoRA")}
    assert {"lora_data_directory", "image_buckets_step", "train_textencoder_learning_rate"} <= lora
    assert "diff_alt_ratio" not in lora
    assert {p.name for p in params_for_mode("D2")} == {p.name for p in PARAMS if p.second_pass}
    assert "diff_target_name" in {p.name for p in params_for_mode("Multi-ADDifT")}
    with pytest.raises(ValueError, match="unknown mode"):
        params_for_mode("Lora")
    assert OPTIMIZER_ALIASES["adamw"] == "AdamW" and OPTIMIZER_ALIASES["dadaptadagrad"] == "DAdaptAdaGrad"
    with pytest.raises(KeyError, match="network_rank"):
        param("netwrk_rank")


# --- reference presets -------------------------------------------------------------------

def _expected(p, raw):
    """What the typed value of a raw reference value must be, worked out from the raw text."""
    if p.kind == "bool":
        return raw is True
    if p.kind == "int":
        return int(float(raw))
    if p.kind == "float":
        return float(raw)
    if p.kind == "optional_float":
        return float(raw) if raw not in ("", "0") else None
    if p.kind == "size":
        sides = [int(s) for s in raw.split(",")]
        return (sides[0], sides[-1])
    if p.kind == "choice":
        return next(c for c in p.choices if c.lower() == raw.lower())
    if p.kind == "blocks":  # a set of ids; kept in the UI's order whatever order the file has
        return [b for b in C.BLOCKID26 if b in raw]
    return raw


def _check_meaning(config: TrainConfig, data: dict) -> None:
    for p in PARAMS:
        value = getattr(config, p.name)
        if p.key in data:
            assert value == _expected(p, data[p.key]), p.key
        else:
            assert value == (list(p.default) if p.kind == "blocks" else p.default), p.key


@pytest.mark.parametrize("path", _reference_files(), ids=lambda p: p.stem)
def test_reference_preset_loads_with_its_meaning(path, reference_presets_dir):
    data = json.loads(path.read_text(encoding="utf-8"))
    config = TrainConfig.from_json(path)
    _check_meaning(config, data)
    assert config.mode == data["mode"] and config.model == ""
    assert config.vae == ("" if data["vae"] in ("", "None") else data["vae"])
    assert (config.original_prompt, config.target_prompt) == (data["original prompt"], data["target prompt"])
    assert config.warnings == []
    if data.get("2nd pass"):
        _check_meaning(config.second_pass, {**data, **data["2nd pass"]})
    else:
        assert config.second_pass is None
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_reference_values_spot_checks(reference_presets_dir):
    cfg = TrainConfig.from_json(reference_presets_dir / "ADDifT_Style_XL.json")
    assert cfg.train_optimizer == "CAME" and cfg.network_strength == 2.0 and cfg.train_snr_gamma == 1.0
    assert (cfg.train_min_timesteps, cfg.train_max_timesteps) == (200, 400)
    assert "BASE" not in cfg.network_blocks and len(cfg.network_blocks) == 25
    assert cfg.train_lr_scheduler_settings == "eta_min=0.00001"
    lora = TrainConfig.from_json(reference_presets_dir / "LoRA.json")
    assert lora.train_optimizer == "AdamW" and lora.logging_save_csv is False
    assert lora.train_textencoder_learning_rate is None and lora.image_size == (512, 512)


# --- saving and reloading ----------------------------------------------------------------

def test_to_dict_order_and_raw_forms(reference_presets_dir):
    cfg = TrainConfig.from_json(reference_presets_dir / "Difference_Use2ndPass.json")
    cfg = cfg.replace(negative_prompt="blurry", original_image="a.png", image_size=(768, 512))
    data = cfg.to_dict()
    keys = list(data)
    assert keys[:59] == REFERENCE_KEYS
    assert keys[59:66] == ["2nd pass", "mode", "model", "vae", "te", "original prompt", "target prompt"]
    assert keys[66:66 + len(EXTENSION_NAMES)] == [param(n).key for n in EXTENSION_NAMES]
    assert keys[66 + len(EXTENSION_NAMES):] == ["negative prompt", "original image"]  # empty target image is left out
    assert data["network_rank"] == "16" and data["train_learning_rate"] == "0.0005"
    assert data["image_size(height, width)"] == "768,512" and data["train_textencoder_learning_rate"] == ""
    assert data["use_gradient_checkpointing"] is False and isinstance(data["network_blocks(BASE = TextEncoder)"], list)
    assert data["2nd pass"]["network_rank"] == "4" and data["2nd pass"]["train_learning_rate"] == "0.0001"
    assert "2nd pass" not in cfg.replace(mode="LoRA").to_dict()


def test_json_round_trip_is_lossless(tmp_path, reference_presets_dir):
    cfg = TrainConfig.from_json(reference_presets_dir / "Difference_Use2ndPass.json").replace(
        target_prompt="キャラクター", train_textencoder_learning_rate=5e-5, gradient_accumulation_steps=4,
        addift_timestep_schedule="random", train_noise_offset=0.05, image_size=(512, 768),
        original_image="o.png", target_image="t.png", vae="vae.safetensors")
    out = cfg.to_json(tmp_path / "sub" / "cfg.json")
    text = out.read_text(encoding="utf-8")
    assert "キャラクター" in text and text.startswith('{\n    "network_type"')
    back = TrainConfig.from_json(out)
    assert back == cfg and back.second_pass == cfg.second_pass and back.image_size == (512, 768)
    assert back != cfg.replace(network_rank=8)


# --- tolerant reading --------------------------------------------------------------------

def test_coercion_is_tolerant():
    cfg = TrainConfig.from_dict({
        "network_rank": 32, "network_alpha": "0.5", "train_iterations": "30.0", "train_optimizer": "adamw8BIT",
        "train_model_precision": "bfloat16", "save_precision": "FP8", "logging_save_csv": "", "model_v_pred": "true",
        "network_blocks(BASE = TextEncoder)": "in01, M00,OUT11", "image_size": "768, 512",
        "train_textencoder_learning_rate": "abc", "network_element": "crossattention", "mode": "ileco",
        "vae": "None", "model": None, "network_rank_typo": 1, "network_conv_rank": "96",
    })
    assert (cfg.network_rank, cfg.network_alpha, cfg.train_iterations) == (32, 0.5, 30)
    assert (cfg.train_optimizer, cfg.train_model_precision, cfg.save_precision) == ("AdamW8bit", "bf16", "fp16")
    assert cfg.logging_save_csv is False and cfg.model_v_pred is True
    assert cfg.network_blocks == ["IN01", "M00", "OUT11"] and cfg.image_size == (768, 512)
    assert cfg.train_textencoder_learning_rate is None and cfg.network_element == "CrossAttention"
    assert (cfg.mode, cfg.vae, cfg.model) == ("iLECO", "", "")
    assert cfg.network_conv_rank == 96  # not in the dropdown, but a valid rank
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith("unknown key 'network_rank_typo' ignored (did you mean 'network_rank'")
    for blank in ("", "0", 0, None):
        assert TrainConfig(train_textencoder_learning_rate=blank).train_textencoder_learning_rate is None


def test_ignored_keys_are_quiet_and_unknown_keys_are_named():
    quiet = {k: "1" for k in ("diff_use_fixed_noise", "logging_use_wandb", "logging_dir", "train_repeat",
                              "train_use_bucket", "train_optimizer_args", "gen_noise_scheduler",
                              "lora_train_targets", "image_use_transparent_background_ajust")}
    assert TrainConfig.from_dict(quiet).warnings == []
    cfg = TrainConfig.from_dict({**quiet, "foo": 1, "gradient_accumulation_steps": "3"})
    assert cfg.gradient_accumulation_steps == 3
    assert len(cfg.warnings) == 1 and "'foo'" in cfg.warnings[0]


def test_reference_fallbacks_warn():
    cfg = TrainConfig.from_dict({"train_lr_scheduler_num_cycles": "0", "train_lr_scheduler_power": "-2"})
    assert cfg.train_lr_scheduler_num_cycles == 1 and cfg.train_lr_scheduler_power == 1.0
    assert any("train_lr_scheduler_num_cycles" in w for w in cfg.warnings)
    loha = TrainConfig(network_type="loha", network_strength=3, network_element="SelfAttention")
    assert any("network_strength" in w for w in loha.warnings) and any("network_element" in w for w in loha.warnings)


# --- validation --------------------------------------------------------------------------

BAD_VALUES = [
    ("network_rank", "-4",
     'network_rank: "-4" is not allowed; use a whole number ≥ 1 (the UI offers 4, 8, ... 1024)'),
    ("train_optimizer", "adamx", 'train_optimizer: "adamx" is not a known optimizer. Did you mean \'Adam\'? Choose one of AdamW, AdamW8bit,'),
    ("train_optimizer", "----", "separator"),
    ("image_size(height, width)", "768,abc",
     'image_size(height, width): "768,abc" must be one number or two numbers separated by a comma, e.g. "768,512"'),
    ("image_size(height, width)", "768,500", "multiple of 8"),
    ("image_size(height, width)", "1,2,3", "one number or two numbers"),
    ("network_alpha", "-1", "network_alpha:"),
    ("train_iterations", "0", "train_iterations:"),
    ("train_batch_size", "two", "train_batch_size:"),
    ("train_learning_rate", "0", "train_learning_rate:"),
    ("train_learning_rate", "nan", "train_learning_rate:"),
    ("image_buckets_step", "0", "loop forever"),
    ("image_min_length", "500", "multiple of 8"),
    ("train_min_timesteps", "1000", "train_min_timesteps:"),
    ("train_max_timesteps", "0", "train_max_timesteps:"),
    ("train_seed", "-2", "train_seed:"),
    ("network_strength", "-1", "network_strength:"),
    ("network_type", "lokr", "network_type:"),
    ("train_lr_scheduler", "cosinus", "train_lr_scheduler:"),
    ("train_model_precision", "fp64", "train_model_precision:"),
    ("train_lora_precision", "int8", "train_lora_precision:"),
    ("network_blocks(BASE = TextEncoder)", [], "no block is selected"),
    ("network_blocks(BASE = TextEncoder)", ["IN12"], '"IN12" is not a block id'),
    ("use_gradient_checkpointing", "maybe", "use_gradient_checkpointing:"),
    ("train_textencoder_learning_rate", "-1e-4", "train_textencoder_learning_rate:"),
    ("train_optimizer_settings", "weight_decay 0.01", "train_optimizer_settings:"),
    ("train_lr_scheduler_settings", "eta_min=(1,", "train_lr_scheduler_settings:"),
    ("train_lr_step_rules", "1:x,0.1", "train_lr_step_rules:"),
    ("save_lora_name", "out/name", "save_lora_name:"),
    ("gradient_accumulation_steps", "0", "gradient_accumulation_steps:"),
    ("addift_timestep_schedule", "sometimes", "addift_timestep_schedule:"),
    ("mode", "Train", "mode:"),
    ("model", 5, "model:"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=lambda v: str(v)[:30])
def test_wrong_value_is_named(key, value, message):
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({key: value})
    assert len(caught.value.problems) == 1, caught.value.problems
    assert message in caught.value.problems[0]
    assert isinstance(caught.value, ValueError)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({"network_rank": "x", "train_batch_size": "0", "train_min_timesteps": "900",
                               "train_max_timesteps": "100", "train_optimizer": "nope", "foo": 1})
    problems = caught.value.problems
    assert len(problems) == 4 and str(caught.value).count("\n") == 3
    for key in ("network_rank", "train_batch_size", "train_optimizer", "train_min_timesteps (900)"):
        assert any(p.startswith(key) for p in problems), key
    assert any("'foo'" in w for w in caught.value.warnings)


def test_constructor_and_replace_validate():
    with pytest.raises(ConfigError, match="not a setting.*network_rank"):
        TrainConfig(network_rnk=4)
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match="train_batch_size"):
        cfg.replace(train_batch_size=0)
    with pytest.raises(AttributeError, match="replace"):
        cfg.network_rank = 4
    assert cfg.replace(network_rank="8").network_rank == 8 and cfg.network_rank == 16


def test_check_for_run_names_what_each_mode_needs():
    needs = {
        "LoRA": "lora_data_directory", "Multi-ADDifT": "diff_target_name", "iLECO": "original prompt",
        "Difference": "original image", "ADDifT": "target image",
    }
    for mode, fragment in needs.items():
        with pytest.raises(ConfigError) as caught:
            TrainConfig(mode=mode).check_for_run()
        assert any(fragment in p for p in caught.value.problems), mode
    TrainConfig(mode="LoRA", lora_data_directory="imgs").check_for_run()
    TrainConfig(mode="iLECO", original_prompt="Mona Lisa").check_for_run()
    TrainConfig(mode="Multi-ADDifT", lora_data_directory="pairs", diff_target_name="_b").check_for_run()
    pair = dict(original_image="a.png", target_image="b.png")
    TrainConfig(mode="ADDifT", **pair).check_for_run()
    # 1st pass only saves the copy network by itself (the reference saved nothing)
    TrainConfig(mode="Difference", diff_1st_pass_only=True, **pair).check_for_run()


def test_settings_strings_are_checked_on_load():
    good = "weight_decay = 0.01; betas=(0.9, 0.99)\neps=1e-8\n"
    assert TrainConfig(train_optimizer_settings=good).train_optimizer_settings == good  # kept as written
    assert TrainConfig(train_lr_scheduler_settings="mode=triangular2").train_lr_scheduler_settings
    with pytest.raises(ConfigError) as caught:
        TrainConfig(train_optimizer_settings="eta_min", train_lr_scheduler_settings="gamma=(1,")
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "train_optimizer_settings", "train_lr_scheduler_settings"]
    assert parse_step_rules("1:100, 0.5:200, 0.1") == [(1.0, 100), (0.5, 200), 0.1]


# --- 2nd pass ----------------------------------------------------------------------------

def test_pass2_takes_panel_values_only_when_enabled(reference_presets_dir):
    cfg = TrainConfig.from_json(reference_presets_dir / "Difference_Use2ndPass.json")
    cfg = cfg.replace(lora_data_directory="d", save_lora_name="slider")
    second = cfg.pass2()
    assert (second.network_rank, second.network_alpha, second.train_learning_rate) == (4, 4.0, 1e-4)
    assert second.save_lora_name == "slider" and second.lora_data_directory == "d"  # not in the panel
    assert second.use_2nd_pass_settings is True and second.second_pass is None
    off = cfg.replace(use_2nd_pass_settings=False).pass2()
    assert off.network_rank == 16 and off.train_learning_rate == 5e-4
    assert off == cfg.replace(use_2nd_pass_settings=False, second_pass=None)


def test_second_pass_inherits_missing_keys_and_reports_its_problems():
    cfg = TrainConfig.from_dict({"mode": "Difference", "train_iterations": "700", "use_2nd_pass_settings": True,
                                 "2nd pass": {"network_rank": "4", "bar": 1}})
    assert cfg.second_pass.train_iterations == 700 and cfg.pass2().network_rank == 4
    assert cfg.warnings == ["2nd pass: unknown key 'bar' ignored"]
    assert TrainConfig.from_dict({"mode": "Difference", "2nd pass": {}}).second_pass is None
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({"mode": "Difference", "2nd pass": {"network_rank": "x"}})
    assert caught.value.problems[0].startswith("2nd pass: network_rank:")
    lora = TrainConfig.from_dict({"mode": "LoRA", "2nd pass": {"network_rank": "4"}})
    assert lora.second_pass is None and "only Difference" in lora.warnings[0]


# --- --set overrides ---------------------------------------------------------------------

def test_with_override():
    cfg = TrainConfig()
    assert cfg.with_override("network_rank=8").network_rank == 8
    assert cfg.with_override("image_size(height, width)=768,512").image_size == (768, 512)
    assert cfg.with_override("network_blocks=BASE,IN01").network_blocks == ["BASE", "IN01"]
    assert cfg.with_override("use_gradient_checkpointing=true").use_gradient_checkpointing is True
    assert cfg.with_override("original prompt=a=b").original_prompt == "a=b"
    assert cfg.with_override("mode=ADDifT").mode == "ADDifT"
    with pytest.raises(ConfigError, match="did you mean 'network_rank'"):
        cfg.with_override("netwrk_rank=8")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        cfg.with_override("network_rank")
    with pytest.raises(ConfigError, match="network_rank"):
        cfg.with_override("network_rank=big")


# --- check-config ------------------------------------------------------------------------

def test_check_config_valid_file(capsys, reference_presets_dir):
    assert cli_main(["check-config", str(reference_presets_dir / "Difference_Use2ndPass.json")]) == 0
    out = capsys.readouterr().out
    assert "  network_rank: 16\n" in out and "  train_optimizer: AdamW\n" in out
    assert "  mode: Difference\n" in out and "2nd pass (used): network_rank = 4" in out
    assert "before training: original image is not set" in out


def test_check_config_broken_and_missing_files(capsys, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "network_rank": "4",\n}\n', encoding="utf-8")
    assert cli_main(["check-config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "line 3, column 1" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["check-config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]", encoding="utf-8")
    assert cli_main(["check-config", str(listed)]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_check_config_bad_values(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"network_rank": "-4", "train_optimizer": "adamx", "zzz": 1}), encoding="utf-8")
    assert cli_main(["check-config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "bad.json: 2 problem(s)" in captured.err
    assert 'network_rank: "-4"' in captured.err and 'train_optimizer: "adamx"' in captured.err
    assert "unknown key 'zzz'" in captured.err


# --- shipped presets ---------------------------------------------------------------------

def test_shipped_presets_are_complete():
    assert sorted(p.stem for p in PRESETS.glob("*.json")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset_passes_check_config(name, capsys):
    path = PRESETS / f"{name}.json"
    assert cli_main(["check-config", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out
    data = json.loads(path.read_text(encoding="utf-8"))
    cfg = TrainConfig.from_dict(data)
    assert data["model"] == "" and list(data)[:59] == REFERENCE_KEYS
    assert cfg.mode == name.split("_")[0] and cfg.to_dict() == data  # written by to_json, unchanged since
    if cfg.mode in ("ADDifT", "iLECO", "Difference", "Multi-ADDifT"):
        assert "BASE" not in cfg.network_blocks  # the text encoder is not trained in these modes
    if name == "Difference_Use2ndPass":
        assert cfg.use_2nd_pass_settings and cfg.pass2().network_rank < cfg.network_rank
    assert cfg.mode in C.MODES


def test_saved_json_has_the_usual_file_mode_and_no_temp_file(tmp_path):
    from trainer import atomic

    path = TrainConfig(save_lora_name="mode_check").to_json(tmp_path / "deep" / "s.json")
    assert path.stat().st_mode & 0o777 == atomic.new_file_mode()  # not mkstemp's 0o600
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]


def test_trainconfig_attributes_are_typed_from_the_schema():
    """The typed attribute block of TrainConfig is the schema's, so a type checker sees every
    setting with its type (a Literal of the choices where there are choices)."""
    from pathlib import Path

    from trainer.config import settings
    from trainer.config.schema import annotation_lines

    source = Path(settings.__file__).read_text(encoding="utf-8")
    begin, end = "    # --- begin generated attributes ---\n", "    # --- end generated attributes ---\n"
    block = source[source.index(begin) + len(begin):source.index(end)].rstrip("\n").splitlines()
    expected = annotation_lines()
    assert block == expected, ("TrainConfig's generated attributes differ from the schema; replace the block "
                               "in trainer/config/settings.py with:\n" + "\n".join(expected))
    hints = settings.TrainConfig.__annotations__
    assert set(hints) == {p.name for p in PARAMS} | set(settings._TEXT_FIELDS) | {"mode", "second_pass", "warnings"}
    config = TrainConfig(network_rank="8", image_size="640,512", network_blocks="BASE,IN01")
    assert (config.network_rank, config.image_size, config.network_blocks) == (8, (640, 512), ["BASE", "IN01"])
