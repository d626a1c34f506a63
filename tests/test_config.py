"""Run configs: defaults, file + --set precedence, one-line errors that list the valid keys."""
import tomllib

import pytest

from conftest import REPO, run_python
from hpclm import config
from hpclm.config import ConfigError


def test_file_then_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nn_layer = 6\nsoftmax = "torch"\n[optim]\nlr = 1\n[train]\nmax_iters = 10\n')
    cfg = config.load(f, ["train.max_iters=20", "model.softmax=sdpa", "dist.fp16_compression=true"])
    assert cfg.model.n_layer == 6
    assert cfg.train.max_iters == 20  # --set wins over the file
    assert cfg.model.softmax == "sdpa"  # unquoted strings are accepted on the command line
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an int where a float is expected
    assert cfg.dist.fp16_compression is True
    assert cfg.model.n_head == config.ModelConfig().n_head  # untouched keys keep defaults


def test_resolved_config_round_trips_through_toml():
    cfg = config.load(None, ["optim.lr=3e-4", 'data.path="dir with \\"quotes\\""', "dist.timeline=t.json"])
    again = config.from_dict(tomllib.loads(config.to_toml(cfg, "header\nline two")))
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("model.n_layers=2", "unknown key in [model] 'n_layers' (from --set) (did you mean 'n_layer'?); valid: activation, arch, bias,"),
    ("modle.n_layer=2", "unknown section 'modle' (from --set) (did you mean 'model'?); valid: data, model, optim,"),
    ("train.max_iters=abc", "train.max_iters (from --set) must be an integer, got 'abc' (str)"),
    ("train.max_iters=2.5", "train.max_iters (from --set) must be an integer, got 2.5 (float)"),
    ("model.bias=1", "model.bias (from --set) must be true or false, got 1 (int)"),
    ("model.softmax=flash", "model.softmax (from --set) must be one of auto, fused, torch, sdpa, got 'flash'"),
    ("precision.dtype=fp8", "precision.dtype (from --set) must be one of fp32, fp16, bf16"),
    ("train.max_iters", "--set 'train.max_iters' must look like section.key=value"),
    ("model.n_head=3", "model.n_embd (128) must be a multiple of model.n_head (3)"),
    ("optim.min_lr=1", "optim.min_lr must be in [0, optim.lr]"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_errors_in_a_file_name_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key in \[optim\] 'learning_rate' in .*bad.toml.*valid: beta1, beta2, grad_clip, lr,"):
        config.load(f)
    f.write_text("[optim\nlr = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config.load(f)
    f.write_text("optim = 3\n")
    with pytest.raises(ConfigError, match=r"'optim' in .* must be a \[optim\] table"):
        config.load(f)
    with pytest.raises(ConfigError, match="config file .*missing.toml' not found"):
        config.load(tmp_path / "missing.toml")


def test_shipped_configs_load_and_shakespeare_matches_nanogpt_cpu_run():
    shipped = sorted(f for f in (REPO / "configs").glob("*.toml") if f.stem != "serve")  # serve.toml: hpclm serve's
    assert [f.stem for f in shipped] == ["demo", "gru", "hmm", "ngram", "shakespeare-char", "shakespeare-fast"]
    for f in shipped:  # every key a file sets arrives with the file's value; the rest keep their defaults
        cfg, written = config.load(f), tomllib.loads(f.read_text())
        defaults = config.Config()
        for section in config.SECTIONS:
            for key in vars(getattr(defaults, section)):
                want = written.get(section, {}).get(key, getattr(getattr(defaults, section), key))
                assert getattr(getattr(cfg, section), key) == want, (f.name, section, key)
    assert {f.stem: config.load(f).model.arch for f in shipped} == {
        "demo": "gpt", "gru": "gru", "hmm": "hmm", "ngram": "ngram", "shakespeare-char": "gpt", "shakespeare-fast": "gpt"}
    s = config.load(REPO / "configs" / "shakespeare-char.toml")
    assert (s.model.n_layer, s.model.n_head, s.model.n_embd, s.data.block_size, s.train.batch_size) == (4, 4, 128, 64, 12)
    assert (s.train.max_iters, s.optim.lr_decay_iters, s.optim.lr, s.optim.min_lr, s.optim.warmup_iters) == (2000, 2000, 1e-3, 1e-4, 100)
    assert (s.optim.beta2, s.model.dropout, s.train.eval_interval, s.train.eval_iters) == (0.99, 0.0, 250, 20)
    fast = config.load(REPO / "configs" / "shakespeare-fast.toml")  # the same task: its data and block size
    assert (fast.data.path, fast.data.block_size, fast.train.target_val_loss) == (s.data.path, 64, 1.88)
    assert fast.train.eval_whole_val and fast.precision.dtype == "bf16"
    assert (REPO / "configs" / "shakespeare-fast.toml").read_text().startswith(
        "# mpirun -np 2 hpclm train --config configs/shakespeare-fast.toml\n")  # the command that runs it
    g = config.load(REPO / "configs" / "gru.toml")
    assert (g.model.arch, g.model.n_embd, g.model.hidden_size) == ("gru", 100, 128)


def test_shipped_serve_config_loads_with_its_values():
    from hpclm.serve import config as serve_config
    written = tomllib.loads((REPO / "configs" / "serve.toml").read_text())["serve"]
    cfg = serve_config.load(REPO / "configs" / "serve.toml", ["serve.api_keys=[\"a\", \"b\"]"])
    assert written and all(getattr(cfg, k) == v for k, v in written.items()) and cfg.api_keys == ["a", "b"]
    with pytest.raises(ConfigError, match=r"unknown key in \[serve\] 'max_runing'.*did you mean 'max_running'"):
        serve_config.load(None, ["serve.max_runing=2"])
    with pytest.raises(ConfigError, match="serve.api_keys .*must be a list of strings"):
        serve_config.load(None, ["serve.api_keys=3"])


def test_cli_config_error_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = run_python(["-m", "hpclm", "train", "--out", str(out), "--set", "model.n_layers=2"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown key in [model] 'n_layers'" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
