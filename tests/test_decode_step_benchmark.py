"""benchmarks/decode_step.py's variant syntax and GEMV naming (the timing itself needs a GPU)."""

from types import SimpleNamespace as Namespace

import pytest

from benchmarks.decode_step import gemv_kinds, parse_variant


def test_variants_parse_into_settings():
    assert parse_variant("base:") == ("base", {})
    assert parse_variant("lean:drop=attention+norms;gemv_down=8,1024,4;partition=64") == (
        "lean", {"drop": "attention+norms", "gemv_down": "8,1024,4", "partition": "64"})


@pytest.mark.parametrize("text", [":drop=norms", "x:drop=mlp", "x:gemv_lm=4,1024,4", "x:partition", "x:speed=2"])
def test_a_bad_variant_is_refused_with_what_is_wrong(text):
    with pytest.raises(ValueError, match="variant"):
        parse_variant(text)


def test_each_decoder_gemv_is_named_by_its_weight_shape():
    def linear(n, k):
        return Namespace(weight=Namespace(shape=(n, k)))

    layer = Namespace(self_attn=Namespace(qkv_proj=linear(4096, 1024), o_proj=linear(1024, 2048)),
                      mlp=Namespace(gate_up_proj=linear(6144, 1024), down_proj=linear(1024, 3072)))
    assert gemv_kinds(layer) == {(4096, 1024): "qkv", (1024, 2048): "o", (6144, 1024): "gate_up",
                                 (1024, 3072): "down"}
