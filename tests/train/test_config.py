"""The training config: YAML + overrides, errors that name the key and suggest the right one."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetrace.errors import ConfigError
from finetrace.train import TrainConfig, describe, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MINIMAL = "base_model: tiny\ndataset: toy\noutput_name: toy-lora\n"


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(MINIMAL + "lora:\n  r: 8\nlr: 1.0e-3\n")
    cfg = load_config(f, ["lora.alpha=4", "batch_size=2", "lora.target_modules=[q_proj, v_proj]"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lr, cfg.batch_size) == (8, 4.0, 1e-3, 2)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.target_modules != TrainConfig(base_model="a", dataset="b", output_name="c").lora.target_modules


@pytest.mark.parametrize(
    "text,key,suggestion,line",
    [
        ("learning_rate: 1.0e-3\n", "learning_rate", "lr", 4),
        ("lora:\n  rank: 8\n", "lora.rank", "lora.r", 5),
        ("batchsize: 4\n", "batchsize", "batch_size", 4),
        ("gradient_accumulation_steps: 2\n", "gradient_accumulation_steps", "grad_accum", 4),
    ],
)
def test_unknown_key_is_named_with_file_line_and_suggestion(tmp_path, text, key, suggestion, line):
    f = tmp_path / "c.yaml"
    f.write_text(MINIMAL + text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert f"field '{key}'" in msg and f"did you mean '{suggestion}'" in msg and f"c.yaml:{line}" in msg


def test_bad_override_and_bad_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(MINIMAL)
    with pytest.raises(ConfigError, match="'lora.rnk'.*did you mean 'lora.r'"):
        load_config(f, ["lora.rnk=4"])
    with pytest.raises(ConfigError, match="field 'batch_size'"):
        load_config(f, ["batch_size=0"])
    with pytest.raises(ConfigError, match="field 'method'"):
        load_config(f, ["method=qlora8"])
    with pytest.raises(ConfigError, match="field 'output_name'.*missing"):
        load_config(None, ["base_model=x", "dataset=y"])


def test_shipped_configs_parse_and_every_key_is_documented():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files, "configs/ should ship examples"
    for f in files:
        load_config(f)
    text = describe()
    for name, info in TrainConfig.model_fields.items():
        assert info.description, f"{name} has no description"
        assert f"\n{name}:" in "\n" + text


def test_cli_print_config(tmp_path, capsys):
    from finetrace.cli import main

    f = tmp_path / "c.yaml"
    f.write_text(MINIMAL)
    assert main(["train", str(f), "--set", "lora.r=4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  r: 4" in out and "output_name: toy-lora" in out
    assert main(["train", str(f), "--set", "seeds=1", "--print-config"]) == 2
    assert "did you mean 'seed'" in capsys.readouterr().err


def test_device_is_validated_and_a_missing_gpu_is_a_clear_error():
    import torch

    from finetrace.errors import ConfigError, DependencyError
    from finetrace.train.distributed import resolve_device

    with pytest.raises(ConfigError) as err:
        load_config(None, ["base_model=b", "dataset=d", "output_name=o", "device=gpu0"])
    assert err.value.field == "device"
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DependencyError, match="no CUDA GPU"):
            resolve_device("cuda:0")
