import json

import pytest
import torch

from kitelm.config import ModelConfig
from kitelm.presets import get_preset, list_presets
from kitelm.errors import ConfigError
from kitelm.models import build_model


def test_validation_names_field_and_fix():
    with pytest.raises(ConfigError, match=r"n_heads=5 does not divide width=256"):
        ModelConfig(width=256, n_heads=5)
    with pytest.raises(ConfigError, match=r"n_kv_heads=3 must divide n_heads=8"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match=r"mlp='swish' is unknown"):
        ModelConfig(mlp="swish")
    with pytest.raises(ConfigError, match=r"n_layers=0 must be a positive integer"):
        ModelConfig(n_layers=0)


def test_json_round_trip(tmp_path):
    config = ModelConfig(name="x", width=96, n_heads=6, n_kv_heads=2, mlp="relu", mlp_hidden=200)
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["n_kv_heads"] == 2


def test_unknown_field_and_override_errors(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"widht": 3}))
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.load(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        ModelConfig().with_overrides(["n_layer=3"])
    assert ModelConfig().with_overrides(["n_layers=3", "mlp=relu"]).n_layers == 3


def test_overrides_are_parsed_by_the_fields_type_and_named_in_the_config():
    c = get_preset("transformer-mini").with_overrides(["tie_embeddings=no", "n_kv_heads=none", "n_heads=3",
                                                        "rope_base=5e4", "mlp=relu"])
    assert (c.tie_embeddings, c.n_kv_heads, c.n_heads, c.rope_base, c.mlp) == (False, None, 3, 50000.0, "relu")
    assert c.name == "transformer-mini[tie_embeddings=no,n_kv_heads=none,n_heads=3,rope_base=5e4,mlp=relu]"
    for bad, expected in (("tie_embeddings=maybe", "not a valid bool"), ("n_layers=2.5", "not a valid int"),
                          ("rope_base=nan", "not a valid float")):
        with pytest.raises(ConfigError, match=expected):
            ModelConfig().with_overrides([bad])


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean transformer-small"):
        get_preset("transformer-smal")


def test_every_preset_builds_on_meta_device():
    for config in list_presets():
        model = build_model(config, device="meta")
        assert 0 < model.num_params(non_embedding=True) <= model.num_params()


def test_gqa_reduces_kv_parameters():
    mha = build_model(ModelConfig(width=64, n_heads=4, n_layers=1), device="meta").num_params()
    mqa = build_model(ModelConfig(width=64, n_heads=4, n_kv_heads=1, n_layers=1), device="meta").num_params()
    assert mha - mqa == 2 * 64 * (64 - 16)


def test_weight_decay_groups_exclude_vectors():
    model = build_model(get_preset("transformer-tiny"))
    decay, no_decay = model.weight_decay_groups(0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 2 * 2 + 1  # 2 norms per block + final
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
