from dataclasses import dataclass, field

import pytest
import yaml

from immunize.config import fingerprint, parse_config, write_provenance
from immunize.errors import ImmunizeError


@dataclass
class Demo:
    model: str = "m"
    learning_rate: float = 1e-5
    layers: list[int] = field(default_factory=lambda: [1, 2])
    use_lora: bool = False


def test_yaml_then_flags_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: from-yaml\nlearning_rate: 3.0e-5\nuse_lora: true\n")
    (cfg,) = parse_config([Demo], ["--config", str(cfg_file), "--learning_rate", "6e-5"], prog="t")
    assert cfg == Demo(model="from-yaml", learning_rate=6e-5, layers=[1, 2], use_lora=True)


def test_unknown_yaml_key_is_named(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("modle: typo\n")
    with pytest.raises(ImmunizeError, match=r"c\.yaml: unknown option\(s\) modle"):
        parse_config([Demo], ["--config", str(cfg_file)], prog="t")


def test_malformed_yaml_names_the_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: a\nlayers: [1, 2\n")
    with pytest.raises(ImmunizeError, match=r"c\.yaml:\d+: malformed YAML"):
        parse_config([Demo], ["--config", str(cfg_file)], prog="t")


def test_provenance_written_next_to_outputs(tmp_path):
    write_provenance(tmp_path, {"demo": Demo()})
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["demo"]["learning_rate"] == 1e-5
    prov = (tmp_path / "provenance.json").read_text()
    assert '"torch"' in prov and '"git_revision"' in prov


def test_fingerprint_is_order_independent():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
