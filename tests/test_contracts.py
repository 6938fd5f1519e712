"""Contract tests (issue 23): every registered weight format and every registered weight algorithm, from the
registries themselves, so adding one adds it here.

Formats: for each `FORMATS` entry and each of its own `example_specs()`: RTN → pack → unpack (codes and
parameters exact) → dequantize (within a bound derived from the bit width) → QuantLinear (forward = F.linear
with the dequantized weight; stored tensors = the format's `packed_tensors` declaration) → save → load
(identical tensors and logits). Algorithms: for each `ALGORITHMS` entry, a recipe naming it quantizes a tiny
Llama in the `int` format; save → load gives identical logits.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from quantkit.checkpoint import check_packed_modules, load, packed_names, save
from quantkit.errors import QuantkitError
from quantkit.formats import FORMATS, make_format, packed_tensors
from quantkit.methods.base import ALGORITHMS
from quantkit.nn import QuantLinear
from quantkit.pipeline import quantize_model
from quantkit.recipe import recipe_from_dict

FORMAT_CASES = [pytest.param(spec, id=f"{name}-{i}-{spec.bits}b-g{spec.group_size or 'ch'}")
                for name, cls in FORMATS.items() for i, spec in enumerate(cls.example_specs())]
# [out, in]: a K that no group size / 32-code run / 128-block divides, a whole one, a K below one group
SHAPES = [(24, 200), (16, 256), (8, 40)]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, 3] = 0.4  # an outlier
    return w


def _group_amax(fmt, w: torch.Tensor) -> torch.Tensor:
    """max |w| of each weight's group, broadcast to w's shape [N, K]."""
    out = torch.empty_like(w)
    for s, e in fmt.group_bounds(w.shape[1]):
        out[:, s:e] = w[:, s:e].abs().amax(dim=1, keepdim=True)
    return out


def test_every_format_declares_its_recipe_keys_to_the_recipe_reader():
    import quantkit.recipe as recipe

    assert {"int", "hlq", "int6", "nvfp4"} <= set(FORMATS)
    for name, cls in FORMATS.items():
        keys = tuple(k.name for k in cls.recipe_keys)
        assert recipe._FORMAT_LIMITS[name] == (*cls.bits_range, cls.min_group_size, keys), name
        assert len(set(keys)) == len(keys)
        lo, hi = cls.bits_range
        with pytest.raises(QuantkitError, match=f"out of range for format '{name}'"):
            recipe_from_dict({"weights": {"format": name, "bits": hi + 1}})
        with pytest.raises(QuantkitError, match="unknown recipe key 'not_a_key'"):
            recipe_from_dict({"weights": {"format": name, "bits": lo, "group_size": 128, "not_a_key": 1}})
        for k in cls.recipe_keys:
            if k.choices is not None:
                assert k.default in k.choices
                with pytest.raises(QuantkitError, match=f"{k.name} = 'no-such-value' is unknown"):
                    recipe_from_dict({"weights": {"format": name, "bits": lo, "group_size": cls.min_group_size,
                                                  k.name: "no-such-value"}})


@pytest.mark.parametrize("spec", FORMAT_CASES)
def test_example_specs_are_recipe_specs(spec):
    """The examples parse back from a recipe dict unchanged, and omitted keys take the declared defaults."""
    assert recipe_from_dict({"weights": spec.to_dict()}).weights == spec
    cls = FORMATS[spec.format]
    explicit = type(spec)(spec.format, spec.bits, spec.group_size, spec.symmetric,
                          tuple(sorted({**cls.option_defaults(), **dict(spec.options)}.items())))
    a, b = make_format(spec), make_format(explicit)
    assert {k: v for k, v in vars(a).items() if not isinstance(v, torch.Tensor)} == \
        {k: v for k, v in vars(b).items() if not isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spec", FORMAT_CASES)
def test_format_contract(spec, shape):
    n, k = shape
    fmt = make_format(spec)
    w = _weight(n, k)
    codes, params = fmt.quantize_rtn(w)
    groups = fmt.groups(k)
    assert codes.shape == (n, k) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < (1 << spec.bits)
    assert all(p.shape[:2] == (n, groups) for p in params.values())

    # pack: exactly the declared tensors (names in order, shapes, dtypes)
    packed = fmt.pack(codes, params, k)
    declared = fmt.packed_tensors(n, k)
    assert [(name, tuple(t.shape), t.dtype) for name, t in packed.items()] == \
        [(name, d.shape, d.dtype) for name, d in declared.items()]
    assert packed_tensors(spec, n, k) == declared
    assert fmt.packed_bytes(n, k) == sum(t.numel() * t.element_size() for t in packed.values())
    assert fmt.bits_per_weight(k, n) == fmt.packed_bytes(n, k) * 8 / (n * k)

    # unpack: codes and parameters exact; padding codes are zero
    kp = fmt.padded_k(k)
    codes2, params2 = fmt.unpack(packed, kp)
    assert torch.equal(codes2[:, :k].to(torch.int64), codes)
    assert not codes2[:, k:].any()
    assert set(params2) == set(params)
    for key in params:
        assert torch.equal(params2[key].float().expand_as(params[key]), params[key].float()), key

    # dequantize: the same weight from either side, within the bit width's error bound
    w_hat = fmt.dequantize_grouped(codes, params)
    assert w_hat.shape == (n, k) and w_hat.dtype == torch.float32
    assert torch.equal(fmt.dequantize_grouped(codes2[:, :k].to(torch.int64), params2), w_hat)
    err = (w - w_hat).abs()
    amax = _group_amax(fmt, w)
    # one step of a signed b-bit grid over the group is amax / (2^(b-1) - 1): RTN's worst error is half of it
    # on a uniform grid; 1.5 steps leaves room for non-uniform grids (e2m1's top gap is two steps) and for
    # clipping / fitting searches. On average a uniform grid's error is step/sqrt(12) ~ 0.29 amax / 2^(b-1).
    levels = 1 << (spec.bits - 1)
    assert (err <= 1.5 * amax / (levels - 1)).all(), float((err / amax).max())
    rms = err.square().mean().sqrt()
    assert rms <= 0.5 * amax.square().mean().sqrt() / levels, float(rms)

    # QuantLinear: holds the declared tensors, forward = F.linear with the dequantized weight
    lin = torch.nn.Linear(k, n, bias=True)
    q = QuantLinear.from_codes(lin, spec, codes, params)
    assert [(name, tuple(t.shape), t.dtype) for name, t in q.packed().items()] == \
        [(name, d.shape, d.dtype) for name, d in declared.items()]
    assert set(q.state_dict()) == {*declared, "bias"}
    assert packed_names(spec, k, n) == {name: (d.shape, d.dtype) for name, d in declared.items()}
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    assert torch.equal(q.dequantize_weight(), w_hat)
    assert torch.equal(q(x), F.linear(x, w_hat, lin.bias))


def _quantize_linears(model, spec) -> dict[str, QuantLinear]:
    """Swap every decoder Linear of `model` for a QuantLinear of `spec` (RTN); returns them by name."""
    out = {}
    for li, layer in enumerate(model.model.layers):
        for path in LINEARS:
            parent_path, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            lin = getattr(parent, child)
            codes, params = make_format(spec).quantize_rtn(lin.weight.detach().float())
            q = QuantLinear.from_codes(lin, spec, codes, params)
            setattr(parent, child, q)
            out[f"model.layers.{li}.{path}"] = q
    return out


@pytest.mark.parametrize("spec", FORMAT_CASES)
def test_format_checkpoint_round_trip(spec, tmp_path):
    model = tiny_llama(layers=1)  # hidden 96, intermediate 200: whole and partial groups
    mods = _quantize_linears(model, spec)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    out = save(model, tmp_path / "ck")
    loaded = load(out)
    for name, q in mods.items():
        lq = loaded.get_submodule(name)
        assert isinstance(lq, QuantLinear) and lq.spec == spec
        assert list(lq.packed()) == list(q.fmt.packed_tensors(q.out_features, q.in_features))
        for pname, t in q.packed().items():
            assert torch.equal(lq.packed()[pname], t) and lq.packed()[pname].dtype == t.dtype
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_save_refuses_packed_tensors_that_differ_from_the_declaration(tmp_path):
    model = tiny_llama(layers=1)
    spec = FORMATS["int"].example_specs()[0]
    mods = _quantize_linears(model, spec)
    check_packed_modules(model)
    q = mods["model.layers.0.mlp.down_proj"]
    q.scales = q.scales.float()  # a wrong dtype, as a buggy format or edit would leave it
    with pytest.raises(QuantkitError, match=r"module 'model\.layers\.0\.mlp\.down_proj' holds packed tensors.*"
                                            r"scales .*float32.*declares"):
        save(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_algorithm_contract(algorithm, calib, tmp_path):
    recipe = recipe_from_dict({"name": f"contract-{algorithm}", "method": {"name": algorithm},
                               "weights": {"format": "int", "bits": 4, "group_size": 32}})
    assert recipe.method.name == algorithm
    model = tiny_llama()
    quantize_model(model, recipe, calib, progress=False)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(mods) == 2 * len(LINEARS)
    assert all(m.spec == recipe.weights for m in mods.values())
    out = save(model, tmp_path / "ck")
    loaded = load(out)
    x = calib[:2]
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
