import pytest

from lowbit.spec import PRESETS, QuantSpec, as_spec, preset, spec_format_names


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_json_and_are_hashable(name):
    spec = preset(name)
    assert QuantSpec.from_json(spec.to_json()) == spec
    assert hash(spec) == hash(QuantSpec.from_dict(spec.to_dict()))


def test_required_presets_exist():
    for name in ["w8", "w4g128", "w4g64", "w3g128", "w2g64", "nf4g64", "fp8", "w8a8"]:
        assert name in PRESETS


def test_short_names():
    assert str(preset("w4g128")) == "uint4-g128-asym"
    assert str(preset("w8")) == "int8-ch-sym"
    assert str(preset("nf4g64")) == "nf4-g64"
    assert str(preset("w8a8")) == "int8-ch-sym+a:int8-token-sym-dyn"
    assert str(QuantSpec("uint4", "group", 64, zero_point="float")) == "uint4-g64-asym-fz"


def test_w8a8_has_dynamic_int8_activation():
    act = preset("w8a8").act
    assert act is not None and act.dynamic and act.bits == 8 and act.granularity == "token"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"format": "int9"}, "format='int9'"),
        ({"format": "uint0"}, "format='uint0'"),
        ({"format": "fp7"}, "allowed"),
        ({"granularity": "row"}, "granularity"),
        ({"group_size": 0}, "group_size"),
        ({"granularity": "block"}, "block"),
        ({"clip_ratio": 1.5}, "clip_ratio"),
        ({"rounding": "up"}, "rounding"),
        ({"scale_dtype": "float64"}, "scale_dtype"),
        ({"format": "int1", "symmetric": True}, "1-bit"),
        ({"format": "nf4", "symmetric": False}, "symmetric=True"),
    ],
)
def test_bad_specs_raise_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        QuantSpec(**kwargs)
    assert "\n" not in str(info.value)


def test_as_spec_and_unknown_preset():
    assert as_spec("w4g64") == preset("w4g64")
    assert as_spec({"format": "int8", "granularity": "tensor", "symmetric": True}).bits == 8
    with pytest.raises(ValueError, match="unknown preset 'w5'"):
        as_spec("w5")
    with pytest.raises(TypeError):
        as_spec(4)
    with pytest.raises(ValueError, match="unknown QuantSpec fields"):
        QuantSpec.from_dict({"bitz": 4})


def test_every_format_name_builds_a_spec():
    for name in spec_format_names():
        fixed_grid = not name.startswith(("int", "uint", "kmeans"))
        one_bit = name in ("int1", "uint1")
        spec = QuantSpec(name, "channel", symmetric=fixed_grid or not one_bit)
        assert 1 <= spec.bits <= 8


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_presets_spec_string_names_it_again(name):
    assert as_spec(str(preset(name))) == preset(name)


@pytest.mark.parametrize("spec", [
    QuantSpec(format="int3", granularity="group", group_size=64, symmetric=True),
    QuantSpec(format="uint4", granularity="block", block=(4, 64), zero_point="float",
              clip_ratio=0.9),
    QuantSpec(format="int4", granularity="channel", axis=1, symmetric=True, rounding="stochastic"),
    QuantSpec(format="kmeans3", granularity="group", group_size=32),
    QuantSpec(format="uint8", granularity="channel", act=QuantSpec(
        format="uint8", granularity="token", dynamic=True, scale_dtype="float32")),
    QuantSpec(format="int4", granularity="channel", axis=-1, symmetric=True),
    QuantSpec(format="int4", granularity="group", group_size=32, clip_ratio=1e-5),
    QuantSpec(format="kmeans4", granularity="group", group_size=64, symmetric=False),
    QuantSpec(format="uint3", granularity="group", group_size=64, symmetric=True,
              full_range=True, clip_ratio=0.9),
    QuantSpec(format="int8", granularity="channel", symmetric=True, full_range=True,
              act=QuantSpec(format="int8", granularity="token", symmetric=True, dynamic=True,
                            scale_dtype="float32")),
])
def test_spec_strings_parse_back_to_their_spec(spec):
    assert as_spec(str(spec)) == spec


@pytest.mark.parametrize("text, match", [
    ("w5g7", "unknown preset 'w5g7'"),
    ("w8a8-dynamic", "unknown preset or spec string 'w8a8-dynamic'.*w4g128.*FORMAT-GRANULARITY"),
    ("int4-g", "no granularity after the format"),
    ("int4-g64-foo", "unknown part 'foo'"),
    ("int4", "unknown preset 'int4'"),
])
def test_bad_spec_strings_say_what_is_allowed(text, match):
    with pytest.raises(ValueError, match=match):
        as_spec(text)


@pytest.mark.parametrize("fields, match", [
    ({"group_size": True}, "group_size=True"),
    ({"symmetric": "no"}, "symmetric='no'; allowed: True, False"),
    ({"dynamic": "false"}, "dynamic='false'"),
    ({"granularity": "channel", "axis": 1.5}, "axis=1.5"),
    ({"granularity": "channel", "axis": True}, "axis=True"),
    ({"clip_ratio": "0.5"}, "clip_ratio='0.5'"),
    ({"granularity": "block", "block": (True, 4)}, "block=\\(True, 4\\)"),
    ({"format": "kmeans4", "rounding": "stochastic"}, "rounding='stochastic' is implemented"),
    ({"act": QuantSpec(format="int8", granularity="token", symmetric=True)},
     "static activation spec .* not 'token'"),
    ({"format": "int4", "full_range": True}, "full_range=True with symmetric=False"),
    ({"format": "nf4", "symmetric": True, "full_range": True},
     "format='nf4': it is for integer grids"),
    ({"format": "int8", "symmetric": True, "full_range": True, "granularity": "token",
      "dynamic": True}, "full_range=True with dynamic=True"),
    ({"act": QuantSpec(format="int8", granularity="tensor", symmetric=True, full_range=True)},
     "full_range is for weights"),
    ({"full_range": 1}, "full_range=1; allowed: True, False"),
])
def test_fields_of_the_wrong_type_or_combination_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**fields)


def test_an_activation_spec_string_takes_the_kernels_float32_scales():
    import torch

    from lowbit.kernels import select_kernel
    from lowbit.tensor import QuantizedTensor

    spec = as_spec("uint4-g64-asym+a:int8-token-sym-dyn")  # no preset prints this
    assert spec.act.scale_dtype == "float32"
    qt = QuantizedTensor.from_float(torch.randn(64, 256), spec)
    assert select_kernel(qt, torch.randn(4, 256)).name == "cpu_w4a8"


def test_fields_a_spec_does_not_use_do_not_make_specs_unequal() -> None:
    assert QuantSpec("int4", "group", 32, axis=1, symmetric=True) == QuantSpec(
        "int4", "group", 32, symmetric=True)
    assert QuantSpec("int8", "channel", symmetric=True, zero_point="float",
                     zero_dtype="bfloat16") == QuantSpec("int8", "channel", symmetric=True)
    assert QuantSpec("nf4", "group", 64, symmetric=True, zero_point="float") == QuantSpec(
        "nf4", "group", 64, symmetric=True)
    # fields that do change the codes still count
    assert QuantSpec("int8", "channel", axis=1, symmetric=True) != QuantSpec(
        "int8", "channel", symmetric=True)
    assert QuantSpec("uint4", zero_point="float") != QuantSpec("uint4")
    assert QuantSpec("uint4", zero_dtype="float32") != QuantSpec("uint4")


def test_full_range_in_spec_strings_and_old_checkpoints():
    assert str(preset("q4_0")) == "int4-g32-sym-full" and preset("q4_0").full_range
    assert not as_spec("int4-g32-sym").full_range
    old = preset("q4_0").to_dict()
    del old["full_range"]  # a spec saved before the field existed: absmax scales
    assert QuantSpec.from_dict(old) == preset("q4_0").replace(full_range=False)
    # written only when set, so older lowbit still reads checkpoints of other specs
    assert "full_range" not in preset("w4g128").to_dict()
    assert QuantSpec.from_dict(preset("q4_0").to_dict()) == preset("q4_0")
