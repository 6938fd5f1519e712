import subprocess
import sys

import pytest

from quantkit.errors import QuantkitError
from quantkit.recipe import load_recipe, recipe_from_dict, shipped_recipes

BACKBONE = ["rtn-w4g128", "rtn-w3g128", "rtn-w2g64", "gptq-w4g128", "gptq-w3g128", "gptq-w2g64"]


def test_backbone_recipes_ship_and_parse():
    names = shipped_recipes()
    for name in BACKBONE:
        assert names.get(name)
        r = load_recipe(name)
        assert r.name == name
        assert r.weights.format == "int" and not r.weights.symmetric
        assert r.method.name == name.split("-")[0]
    assert load_recipe("gptq-w2g64").weights.group_size == 64


def _first_recipe_per_weight_format() -> list[str]:
    import yaml

    from quantkit.recipe import _shipped_dir

    first: dict[str, str] = {}
    for name in sorted(shipped_recipes()):
        fmt = (yaml.safe_load((_shipped_dir() / f"{name}.yaml").read_text()).get("weights") or {}).get("format", "int")
        first.setdefault(fmt, name)
    return sorted(first.values())


@pytest.mark.parametrize("name", _first_recipe_per_weight_format())
def test_recipe_is_the_first_thing_a_process_reads(name):
    """The CLI and the quality job may read a recipe before any format module is imported: each format's
    options (`clip_search`, ...) must be known then. One fresh interpreter per weight format."""
    code = f"import quantkit as qk; print(qk.load_recipe({name!r}).weights.format)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]


def test_recipe_from_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("method: {name: rtn}\nweights: {bits: 5, group_size: channel, symmetric: true}\n")
    r = load_recipe(str(p))
    assert r.name == "mine" and r.weights.bits == 5 and r.weights.group_size is None and r.weights.symmetric


def test_unknown_recipe_name_suggests_nearest():
    with pytest.raises(QuantkitError, match="did you mean 'gptq-w4g128'"):
        load_recipe("gptq-w4g12")


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(QuantkitError, match="unknown recipe key 'grup_size' in weights; did you mean 'group_size'"):
        recipe_from_dict({"weights": {"grup_size": 64}})
    with pytest.raises(QuantkitError, match="unknown recipe key 'methd'.*'method'"):
        recipe_from_dict({"methd": {}})
    with pytest.raises(QuantkitError, match="'act_ordr'.*'act_order'"):
        recipe_from_dict({"method": {"name": "gptq", "act_ordr": True}})


@pytest.mark.parametrize("weights,msg", [
    ({"bits": 1}, r"bits = 1 is out of range for format 'int': use 2\.\.8"),
    ({"bits": 9}, r"bits = 9 is out of range"),
    ({"group_size": 4}, r"group_size = 4 is out of range"),
    ({"bits": "four"}, r"'bits' in weights must be an integer"),
    ({"symmetric": "yes"}, r"must be true or false"),
])
def test_out_of_range_settings(weights, msg):
    with pytest.raises(QuantkitError, match=msg):
        recipe_from_dict({"weights": weights})


def test_targets_ignore_and_overrides():
    r = recipe_from_dict({
        "weights": {"bits": 4, "group_size": 128},
        "ignore": ["*.layers.0.*"],
        "overrides": [{"match": ["down_proj"], "weights": {"bits": 8}},
                      {"match": ["re:.*layers\\.[12]\\.mlp\\..*"], "weights": {"group_size": 64}}],
    })
    assert r.scheme_for("model.layers.0.self_attn.q_proj") is None
    assert r.scheme_for("model.layers.3.self_attn.q_proj").bits == 4
    assert r.scheme_for("model.layers.3.mlp.down_proj").bits == 8
    s = r.scheme_for("model.layers.2.mlp.down_proj")
    assert (s.bits, s.group_size) == (8, 64)


def test_bad_override_is_rejected_early():
    with pytest.raises(QuantkitError, match=r"overrides\[0\]\.weights\.bits = 12"):
        recipe_from_dict({"overrides": [{"match": ["*"], "weights": {"bits": 12}}]})


def test_bad_regex():
    with pytest.raises(QuantkitError, match="bad regular expression"):
        recipe_from_dict({"targets": ["re:(("]})


def test_method_settings_belong_to_the_algorithm():
    """Each algorithm parses its own settings; another algorithm's key is refused with the owner's list,
    except the recorded defaults a checkpoint's recipe echo carries (so that echo parses back)."""
    from quantkit.methods import ALGORITHMS, GPTQ, RTN
    from quantkit.recipe import recipe_from_dict

    assert {"rtn", "gptq"} <= set(ALGORITHMS) and ALGORITHMS["gptq"] is GPTQ and ALGORITHMS["rtn"] is RTN
    g = recipe_from_dict({"name": "x", "method": {"name": "gptq", "damping": 0.05, "act_order": True}})
    assert isinstance(g.method.settings, GPTQ.Settings)
    assert (g.method.settings.damping, g.method.settings.act_order, g.method.settings.block_size) == (0.05, True, 128)
    with pytest.raises(QuantkitError, match=r"'damping' in method is not a setting of method 'rtn' \(its settings: none\)"):
        recipe_from_dict({"name": "x", "method": {"name": "rtn", "damping": 0.05}})
    for name in ("rtn-w4g128", "gptq-w4g128", "flexq-w6a8"):
        r = load_recipe(name)
        echo = r.to_dict()
        assert list(echo["method"]) == ["name", "damping", "block_size", "act_order", "true_sequential",
                                        "sink_weight"]
        assert recipe_from_dict(echo) == r
