import os

import pytest

from conftest import ROOT, run_cli, tiny_config
from lmjax import config as config_lib
from lmjax.config import ConfigError


def test_unknown_override_names_closest_keys():
  with pytest.raises(ConfigError, match=r"train\.stpes.*Did you mean: train\.steps"):
    config_lib.get_config(None, ["train.stpes=3"])


def test_unknown_key_in_file(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from lmjax.config import default_config\n"
                  "def get_config():\n  c = default_config()\n  c.unlock()\n"
                  "  c.model.num_layer = 3\n  return c\n")
  with pytest.raises(ConfigError, match=r"model\.num_layer' .*Did you mean: model\.num_layers"):
    config_lib.get_config(str(path))


def test_wrong_type_is_an_error():
  with pytest.raises(ConfigError, match="train.steps"):
    config_lib.get_config(None, ["train.steps=ten"])
  with pytest.raises(ConfigError, match="model.scan_layers"):
    config_lib.get_config(None, ["model.scan_layers=maybe"])


def test_overrides_parse_types():
  cfg = config_lib.get_config(None, ["optim.learning_rate=1", "model.dtype=bfloat16",
                                     "model.scan_layers=true", "mesh.fsdp=2"])
  assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
  assert cfg.model.dtype == "bfloat16" and cfg.model.scan_layers is True and cfg.mesh.fsdp == 2


@pytest.mark.parametrize("spec", ["quickstart.py", "gpt2.py:124m", "gpt2.py:350m", "gpt2.py:774m",
                                  "gpt2.py:1.5b", "llama.py:60m", "llama.py:125m", "llama.py:1b",
                                  "llama.py:7b"])
def test_shipped_configs_load(spec):
  cfg = config_lib.get_config(os.path.join(ROOT, "configs", spec))
  assert cfg.model.head_dim * cfg.model.num_heads > 0


@pytest.mark.parametrize("spec", ["gpt2.py:124m", "gpt2.py:350m", "gpt2.py:774m", "gpt2.py:1.5b",
                                  "llama.py:125m", "llama.py:1b", "llama.py:7b", "bert.py:base",
                                  "bert.py:large"])
def test_accelerator_configs_scan_and_compute_in_bfloat16(spec):
  """Every shipped config of 124M and above: one compiled layer, bf16 compute on fp32 params."""
  m = config_lib.get_config(os.path.join(ROOT, "configs", spec)).model
  assert (m.scan_layers, m.dtype, m.param_dtype) == (True, "bfloat16", "float32")


def test_the_cpu_quickstart_stays_in_float32():
  m = config_lib.get_config(os.path.join(ROOT, "configs", "quickstart.py")).model
  assert m.dtype == "float32" and m.param_dtype == "float32"


def test_relations_are_checked():
  with pytest.raises(ConfigError, match="num_kv_heads"):
    config_lib.get_config(None, ["model.num_heads=12", "model.num_kv_heads=5"])
  with pytest.raises(ConfigError, match="cudnn"):
    config_lib.get_config(None, ["model.attention=cudnn"])
  with pytest.raises(ConfigError, match="seq_len"):
    config_lib.get_config(None, ["data.seq_len=4096"])


def test_cli_bad_key_leaves_workdir_untouched(tmp_path):
  workdir = tmp_path / "run"
  proc = run_cli("train", "--config=configs/quickstart.py", f"--workdir={workdir}",
                 "--config.optim.lerning_rate=1e-3")
  assert proc.returncode == 2
  assert "optim.learning_rate" in proc.stderr and "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_json_round_trip():
  cfg = tiny_config("mesh.fsdp=2")
  again = config_lib.from_json(config_lib.to_json(cfg))
  assert again.to_dict() == cfg.to_dict()


def test_choices_are_written_once_and_used_everywhere():
  """Each enumerated key's allowed values live in config.CHOICES: validation names them, `lmjax
  config --keys` prints them, and the README's table is generated from them."""
  for key, allowed in config_lib.CHOICES.items():
    with pytest.raises(ConfigError, match=f"{key} must be {'[|]'.join(allowed)}, got 'bogus'"):
      config_lib.get_config(None, [f"{key}=bogus"])
  with open(os.path.join(ROOT, "README.md")) as f:
    assert config_lib.choices_table() in f.read()
  proc = run_cli("config", "--keys")
  assert proc.returncode == 0, proc.stderr
  assert "model.remat = 'none'  (none | full | dots | dots_no_batch)" in proc.stdout
  assert "train.steps = 1000\n" in proc.stdout


def test_model_config_is_the_schemas_model_section():
  import dataclasses

  from lmjax.model import ModelConfig
  schema = config_lib.default_config().model
  assert sorted(f.name for f in dataclasses.fields(ModelConfig)) == sorted(schema.keys())
  made = ModelConfig.create()  # the schema's defaults, with derived values filled
  assert made == ModelConfig.from_config(config_lib.get_config(None))
  assert (made.num_kv_heads, made.head_dim) == (schema.num_heads, schema.d_model // schema.num_heads)


def test_identity_covers_the_model_the_objective_and_a_fine_tuning():
  cfg = tiny_config()
  keys = config_lib.identity(cfg)
  assert {"model.causal", "model.d_model", "model.parametrization", "train.objective"} <= set(keys)
  assert not set(keys) & {f"model.{k}" for k in config_lib.RUNTIME_MODEL_KEYS}
  assert not any(k.startswith(("train.mask", "finetune.")) for k in keys)  # causal, no init
  mlm = config_lib.identity(tiny_config("model.causal=false", "train.objective=masked_lm"))
  assert mlm["train.mask_prob"] == 0.15
  finetune = config_lib.identity(tiny_config("finetune.init=/runs/base"))
  assert finetune["finetune.init"] == "/runs/base" and "finetune.lora_rank" in finetune


def test_saved_config_compares_equal_to_itself(tmp_path):
  """Tuples become lists in config.json: a config with list-valued rules still matches its own
  saved copy, key by key (sweep points compare every key)."""
  from lmjax import workdir as workdir_lib
  cfg = tiny_config("mesh.rules=[['batch', 'data'], ['embed', 'fsdp']]")
  workdir_lib.write_config(cfg, str(tmp_path))
  workdir_lib.check_compatible(cfg, str(tmp_path), every_key=True)
  workdir_lib.check_compatible(cfg, str(tmp_path))
  with pytest.raises(ConfigError, match="mesh.rules"):
    workdir_lib.check_compatible(tiny_config(), str(tmp_path), every_key=True)


def _outside(spec: str, integer: bool) -> list:
  """Values just outside a RANGES spec (config.in_range's grammar)."""
  if spec == "any":
    return []
  if "|" in spec:  # a sentinel or a range: between them, and below both
    return {"-1|>=1": [0, -2], "0|>1": [0.5, -1.0]}[spec]
  step = 1 if integer else 1e-3
  if spec[0] in "[(":
    low, high = (float(x) for x in spec[1:-1].split(","))
    return [low if spec[0] == "(" else low - step, high if spec[-1] == ")" else high + step]
  bound = float(spec.lstrip(">="))
  return [bound if spec[1] != "=" else bound - step]


def test_every_numeric_key_has_a_range_and_values_outside_it_are_refused():
  """Walks the schema: each count and rate has a RANGES entry, its default is inside, and a
  value just outside (keep_checkpoints=0, eval_batches=0, a negative learning rate, seq_len=0,
  ...) is refused with a message that names the key."""
  defaults = config_lib.flat_items(config_lib.default_config())
  numeric = {k for k, v in defaults.items() if isinstance(v, (int, float))
             and not isinstance(v, bool)}
  assert numeric == set(config_lib.RANGES)
  tried = 0
  for key in sorted(numeric):
    spec = config_lib.RANGES[key]
    assert config_lib.in_range(defaults[key], spec), key
    for bad in _outside(spec, isinstance(defaults[key], int)):
      value = int(bad) if isinstance(defaults[key], int) else float(bad)
      with pytest.raises(ConfigError, match=rf"{key}={value!r} is out of range"):
        config_lib.get_config(None, [f"{key}={value}"])
      tried += 1
  assert tried > 60
  for key, value in (("train.keep_checkpoints", 1), ("optim.learning_rate", 1e-9),
                     ("data.val_fraction", 0.0), ("mesh.fsdp", -1)):
    config_lib.get_config(None, [f"{key}={value}"] + (["mesh.data=1"] if key == "mesh.fsdp" else []))


def test_command_flags_out_of_range_are_usage_errors(tmp_path):
  for args, flag in ((["eval", f"--workdir={tmp_path}", "--batches=0"], "--batches"),
                     (["generate", f"--workdir={tmp_path}", "--prompt=x", "--max_new_tokens=0"],
                      "--max_new_tokens"),
                     (["generate", f"--workdir={tmp_path}", "--prompt=x", "--temperature=-1"],
                      "--temperature")):
    proc = run_cli(*args)
    assert proc.returncode == 2 and flag in proc.stderr and "must be at least" in proc.stderr
    assert "Traceback" not in proc.stderr
  assert not any(tmp_path.iterdir())
