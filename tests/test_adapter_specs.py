"""``model.adapter`` without code: mappings, names, import paths and plug-in entry points,
and the check of every adapter path on the model's meta-device skeleton."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers
from tiny import tiny_config

from capscale.checks import load_run_config
from capscale.cli import main
from capscale.errors import ConfigError, ModelError
from capscale.models.adapters import EncoderAdapter, get_adapter, registered_model_types
from capscale.models.inspection import suggest_adapter
from capscale.models.loading import check_encoder
from capscale.models.specs import (
    adapter_fields,
    adapter_from_mapping,
    adapter_problems,
    resolve_adapter,
    skeleton,
    validate_encoder,
)

ROOT = Path(__file__).resolve().parent.parent
BERT_PATHS = {"layers": "encoder.layer", "query": "attention.self.query",
              "key": "attention.self.key", "value": "attention.self.value",
              "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense",
              "ffn_out": "output.dense", "head_linear": "classifier"}


def family_configs() -> dict[str, transformers.PretrainedConfig]:
    """A tiny config of every family with a built-in adapter."""
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "vocab_size": 100}
    out = {f: tiny_config(f) for f in ("bert", "roberta", "xlm-roberta", "electra",
                                       "deberta-v2")}
    out["distilbert"] = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4,
                                                      hidden_dim=64, vocab_size=100)
    out["albert"] = transformers.AlbertConfig(**{**small, "num_hidden_layers": 4},
                                              embedding_size=16, num_hidden_groups=2)
    out["modernbert"] = transformers.ModernBertConfig(**small, pad_token_id=0, bos_token_id=1,
                                                      eos_token_id=2, cls_token_id=1,
                                                      sep_token_id=2)
    out["deberta"] = transformers.DebertaConfig(**small)
    out["mpnet"] = transformers.MPNetConfig(**small)
    return out


def test_mapping_spec_gives_the_adapter_its_fields_say():
    spec = {"layers": "blocks", "qkv": "attn.qkv", "qkv_layout": "per_head",
            "attn_out": "attn.o", "ffn_in": "mlp.up", "ffn_out": "mlp.down",
            "ffn_gated": True, "head_linear": "head.proj", "num_heads_attr": "heads",
            "extra_head_linears": ["attn.pos"], "extra_head_params": ["attn.q_bias"],
            "head_inputs": [["attn", "position_bias", 2]]}
    adapter = adapter_from_mapping(spec, "my-encoder")
    assert adapter == EncoderAdapter(
        model_types=("my-encoder",), layers="blocks", qkv="attn.qkv", qkv_layout="per_head",
        attn_out="attn.o", ffn_in="mlp.up", ffn_out="mlp.down", ffn_gated=True,
        head_linear="head.proj", num_heads_attr="heads", extra_head_linears=("attn.pos",),
        extra_head_params=("attn.q_bias",), head_inputs=(("attn", "position_bias", 2),))
    assert adapter_from_mapping({**spec, "model_types": ["a", "b"]}).model_types == ("a", "b")
    # keys not given keep EncoderAdapter's defaults
    assert adapter_from_mapping({}, "x") == EncoderAdapter(model_types=("x",))


@pytest.mark.parametrize("spec,fragments", [
    ({"layer": "blocks"}, ["model.adapter: unknown key 'layer'", "did you mean layers?",
                           "valid keys: " + ", ".join(adapter_fields())]),
    ({"ffn_gated": "yes"}, ["model.adapter.ffn_gated = 'yes': expected true or false"]),
    ({"qkv_layout": "rows"}, ["qkv_layout 'rows' is not one of stacked, per_head"]),
    ({"query": 3}, ["model.adapter.query = 3: expected a string"]),
    ({"head_inputs": [["attn", 2]]}, ["[module path, argument name, position]"]),
    ({"extra_head_linears": [1]}, ["expected a list of strings"]),
])
def test_malformed_mapping_is_a_config_error(spec, fragments):
    with pytest.raises(ConfigError) as err:
        adapter_from_mapping(spec, "x")
    for fragment in fragments:
        assert fragment in str(err.value)


def test_config_takes_a_mapping_and_checks_its_keys_at_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  preset: tweets\nmodel:\n  adapter:\n    layers: blocks\n"
                    "    query: attn.q\n")
    cfg = load_run_config(path, ["model.adapter.key=attn.k", "model.adapter.ffn_gated=true"])
    assert cfg.model.adapter == {"layers": "blocks", "query": "attn.q", "key": "attn.k",
                                 "ffn_gated": True}
    assert load_run_config(path, ["model.adapter=pkg.mod:ADAPTER"]).model.adapter == \
        "pkg.mod:ADAPTER"
    with pytest.raises(ConfigError, match="unknown key 'qeury'; did you mean query"):
        load_run_config(path, ["model.adapter.qeury=attn.q"])
    with pytest.raises(ConfigError, match=r"model\.adapter = 3: expected"):
        load_run_config(path, ["model.adapter=3"])


def test_names_and_import_paths(tmp_path, monkeypatch):
    assert resolve_adapter(None, "bert") is get_adapter("bert")
    assert resolve_adapter("roberta", "bert") is get_adapter("roberta")
    (tmp_path / "my_adapters.py").write_text(textwrap.dedent("""
        from capscale.models.adapters import EncoderAdapter
        AS_OBJECT = EncoderAdapter(model_types=("mine",), layers="blocks")
        class Table:
            AS_MAPPING = {"layers": "stack", "query": "mixer.q"}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    obj = resolve_adapter("my_adapters:AS_OBJECT", "bert")
    assert obj.model_types == ("mine",) and obj.layers == "blocks"
    mapped = resolve_adapter("my_adapters:Table.AS_MAPPING", "ember")
    assert (mapped.model_types, mapped.layers, mapped.query) == (("ember",), "stack",
                                                                 "mixer.q")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        resolve_adapter("no_such_module:X", "bert")
    with pytest.raises(ConfigError, match="my_adapters has no attribute 'MISSING'"):
        resolve_adapter("my_adapters:MISSING", "bert")
    with pytest.raises(ModelError, match=r"no encoder adapter named 'robertta'.*supported: "):
        resolve_adapter("robertta", "bert")
    with pytest.raises(ModelError, match=r"for model_type 'ember'.*model\.adapter mapping"):
        resolve_adapter(None, "ember")


PLUGIN = '''
from capscale.models.adapters import EncoderAdapter
EMBER = {"layers": "stack", "query": "mixer.to_q", "key": "mixer.to_k",
         "value": "mixer.to_v", "attn_out": "mixer.to_out", "ffn_in": "ff.w_in",
         "ffn_out": "ff.w_out", "head_linear": "score", "num_heads_attr": "attn_heads"}
PAIR = [EncoderAdapter(model_types=("glow-a",), layers="a"),
        {"model_types": ["glow-b"], "layers": "b"}]
NOT_BERT = EncoderAdapter(model_types=("bert",), layers="elsewhere")
'''

PROBE = '''
import json
from capscale.models.specs import plugin_adapters, plugin_errors, resolve_adapter
from capscale.errors import ModelError
first = plugin_adapters()
out = {"loaded_once": plugin_adapters() is first,
       "ember": resolve_adapter(None, "ember").layers,
       "ember_types": list(resolve_adapter(None, "ember").model_types),
       "by_entry_point_name": resolve_adapter("ember", "bert").query,
       "glow": [resolve_adapter(None, t).layers for t in ("glow-a", "glow-b")],
       "bert": resolve_adapter(None, "bert").layers, "errors": plugin_errors()}
try:
    resolve_adapter(None, "unknown-type")
except ModelError as err:
    out["unknown"] = str(err)
print(json.dumps(out))
'''


def test_entry_point_plugins_load_in_a_fresh_process(tmp_path):
    site = tmp_path / "site"
    (site / "glow_plugin").mkdir(parents=True)
    (site / "glow_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "glow_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: glow-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[capscale.models.adapters]\nember = glow_plugin:EMBER\nglow = glow_plugin:PAIR\n"
        "not_bert = glow_plugin:NOT_BERT\nbroken = glow_plugin:MISSING\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{site}", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded_once"]
    assert (out["ember"], out["ember_types"]) == ("stack", ["ember"])  # ep name
    assert out["by_entry_point_name"] == "mixer.to_q"
    assert out["glow"] == ["a", "b"]
    assert out["bert"] == "encoder.layer"  # a built-in adapter wins over a plug-in
    assert len(out["errors"]) == 1 and "broken = glow_plugin:MISSING" in out["errors"][0]
    assert "installed plug-ins: " in out["unknown"] and "glow-a" in out["unknown"]
    assert "failed to load: entry point broken" in out["unknown"]


@pytest.mark.parametrize("family", sorted(family_configs()))
def test_builtin_adapters_fit_and_inspect_guesses_them(family):
    config = family_configs()[family]
    adapter = validate_encoder(config)
    assert config.model_type in registered_model_types()
    model = skeleton(config)
    assert all(p.is_meta for p in model.parameters())
    spec, _ = suggest_adapter(model)
    guessed = adapter_from_mapping(spec, config.model_type)
    assert adapter_problems(guessed, model) == []
    same = [adapter.layer_linears(layer) == guessed.layer_linears(layer)
            for layer in adapter.layer_modules(model)]
    assert all(same) and adapter.head(model) is guessed.head(model)
    assert adapter.num_heads(config) == guessed.num_heads(config)


def _bert_dir(tmp_path: Path) -> Path:
    tiny_config("bert").save_pretrained(tmp_path / "bert")  # a config alone: no weights
    return tmp_path / "bert"


def test_a_missing_path_names_it_and_lists_the_linear_maps(tmp_path):
    spec = {**BERT_PATHS, "query": "attention.self.qry"}
    with pytest.raises(ModelError) as err:
        check_encoder(str(_bert_dir(tmp_path)), spec)
    msg = str(err.value)
    assert "adapter bert does not fit BertForSequenceClassification" in msg
    assert "query 'attention.self.qry' in layer 0 of 2 (BertLayer) is not found " \
           "(did you mean attention.self.query?)" in msg
    listed = msg.split("its linear maps: ")[1]
    assert listed.startswith("attention.self.query [32 -> 32]")  # the closest first
    for path in ("attention.self.key [32 -> 32]", "intermediate.dense [32 -> 64]",
                 "output.dense [64 -> 32]"):
        assert path in listed
    assert "\n" not in msg


def test_wrong_types_shapes_and_attributes(tmp_path):
    config = tiny_config("bert")
    model = skeleton(config)
    bad = adapter_from_mapping({**BERT_PATHS, "ffn_in": "intermediate",
                                "head_linear": "bert.pooler", "num_heads_attr": "n_heads"},
                               "bert")
    problems = adapter_problems(bad, model)
    assert any(p.startswith("ffn_in 'intermediate' in layer 0 of 2 (BertLayer) is a "
                            "BertIntermediate, not nn.Linear (did you mean "
                            "intermediate.dense?)") for p in problems), problems
    assert any(p.startswith("head_linear 'bert.pooler' is a BertPooler, not nn.Linear; "
                            "linear maps of BertForSequenceClassification outside the "
                            "encoder: classifier [32 -> 2]") for p in problems), problems
    assert any(p.startswith("num_heads_attr 'n_heads' is not an integer attribute of "
                            "BertConfig; candidates: num_attention_heads")
               for p in problems), problems
    gated = adapter_from_mapping({**BERT_PATHS, "ffn_gated": True}, "bert")
    assert adapter_problems(gated, model) == [
        "ffn_gated: ffn_in 'intermediate.dense' has 64 outputs, not 2 x the 64 inputs of "
        "ffn_out 'output.dense'"]
    layers = adapter_from_mapping({**BERT_PATHS, "layers": "encoder.layers"}, "bert")
    assert adapter_problems(layers, model) == [
        "layers 'encoder.layers' is not found in BertModel (the base model); its "
        "ModuleLists: encoder.layer (2 x BertLayer)"]
    modern = family_configs()["modernbert"]
    fused = adapter_from_mapping({"layers": "layers", "qkv": "attn.Wqkv", "attn_out": "attn.Wo",
                                  "ffn_in": "mlp.Wi", "ffn_out": "mlp.Wo",
                                  "num_heads_attr": "intermediate_size"}, "modernbert")
    assert adapter_problems(fused, skeleton(modern)) == [
        "qkv 'attn.Wqkv' has 96 outputs, not a multiple of 3 x 64 heads (intermediate_size)",
        "ffn_in 'mlp.Wi' has 128 outputs but ffn_out 'mlp.Wo' takes 64; a gated FFN? set "
        "ffn_gated: true"]


def test_a_bad_adapter_stops_the_run_before_any_weight_loads(tmp_path, tiny_csv, capsys):
    model = _bert_dir(tmp_path)  # no weights: loading them would fail differently
    code = main([f"model.name_or_path={model}", "model.adapter.layers=encoder.layer",
                 "model.adapter.ffn_out=output.dens", f"data.train_file={tiny_csv[0]}",
                 f"data.validation_file={tiny_csv[1]}", f"output_dir={tmp_path / 'out'}",
                 "train.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"capscale: model error: model {model}: adapter bert does not fit")
    assert "ffn_out 'output.dens'" in err and "did you mean output.dense?" in err
    assert not (tmp_path / "out" / "teacher").exists()
