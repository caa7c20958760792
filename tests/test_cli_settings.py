"""Settings from flags, STREAMVLM_* variables and --config files (in that precedence), the API
key from a file, a chat template file, and the --help text of each subcommand."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import typing
from pathlib import Path

import msgspec
import pytest

from streamvlm.cli import (engine_config_from_args, environment_variables,
                           gateway_settings_from_args, parse_args)
from streamvlm.contract.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_flag_over_environment_over_toml_over_default(tmp_path):
    toml = tmp_path / "engine.toml"
    toml.write_text("max_num_seqs = 2\nblock_size = 64\nmax_stop_strings = 3\n")
    environ = {"STREAMVLM_MAX_NUM_SEQS": "8", "STREAMVLM_BLOCK_SIZE": "32",
               "STREAMVLM_CONFIG": str(toml)}
    args = parse_args(["serve", "--max-num-seqs", "4"], environ)
    config = engine_config_from_args(args)
    assert config.scheduler.max_num_seqs == 4          # flag
    assert config.cache.block_size == 32               # environment over the TOML file
    assert config.limits.max_stop_strings == 3         # the TOML file
    assert config.scheduler.max_num_batched_tokens == 2048   # default


def test_lists_bools_json_and_server_options_parse_as_flags_do():
    environ = {"STREAMVLM_DEVICES": "0,1", "STREAMVLM_ENABLE_PREFIX_CACHING": "off",
               "STREAMVLM_ALLOW_REMOTE_IMAGES": "true", "STREAMVLM_ALLOWED_IMAGE_HOSTS": "a.test,b.test",
               "STREAMVLM_OVERRIDE_GENERATION_CONFIG": '{"temperature": 0.6}',
               "STREAMVLM_GENERATION_CONFIG": "none", "STREAMVLM_PORT": "9001",
               "STREAMVLM_HOST": "0.0.0.0", "STREAMVLM_MAX_CONNECTIONS": "7"}
    args = parse_args(["serve"], environ)
    config = engine_config_from_args(args)
    assert config.parallel.devices == [0, 1]
    assert config.cache.enable_prefix_caching is False
    assert config.image.allow_remote_images is True
    assert config.image.allowed_image_hosts == ("a.test", "b.test")
    assert config.model.override_generation_config == {"temperature": 0.6}
    assert config.model.generation_config == "none"
    assert (args.host, args.port) == ("0.0.0.0", 9001)
    assert gateway_settings_from_args(args).max_connections == 7
    flags = parse_args(["serve", "--no-enable-prefix-caching", "--devices", "0,1",
                        "--override-generation-config", '{"temperature": 0.6}'], {})
    assert engine_config_from_args(flags) == engine_config_from_args(
        parse_args(["serve"], {k: environ[k] for k in ("STREAMVLM_ENABLE_PREFIX_CACHING",
                                                       "STREAMVLM_DEVICES",
                                                       "STREAMVLM_OVERRIDE_GENERATION_CONFIG")}))


def test_every_setting_has_a_variable():
    names = {f.name for section in SECTIONS.values() for f in msgspec.structs.fields(section)}
    from streamvlm.gateway.settings import GatewaySettings
    names |= set(GatewaySettings.__struct_fields__)
    assert {"STREAMVLM_" + name.upper() for name in names} <= environment_variables()


@pytest.mark.parametrize("variable, value", [
    ("STREAMVLM_MAX_NUM_SEQS", "many"), ("STREAMVLM_ENFORCE_EAGER", "maybe"),
    ("STREAMVLM_DTYPE", "float8"), ("STREAMVLM_OVERRIDE_GENERATION_CONFIG", "{temperature"),
    ("STREAMVLM_PORT", "http")])
def test_a_bad_value_names_its_variable(variable, value):
    with pytest.raises(ValueError, match=variable):
        parse_args(["serve"], {variable: value})


def test_a_likely_typo_is_logged_with_the_closest_name(caplog):
    with caplog.at_level(logging.WARNING):
        args = parse_args(["serve"], {"STREAMVLM_MAX_NUM_SEQ": "3", "STREAMVLM_GEMV_CONFIG": "x"})
    assert engine_config_from_args(args).scheduler.max_num_seqs == 64
    [record] = [r for r in caplog.records if "STREAMVLM_" in r.getMessage()]
    assert "STREAMVLM_MAX_NUM_SEQ " in record.getMessage()
    assert "STREAMVLM_MAX_NUM_SEQS?" in record.getMessage()


def test_the_api_key_from_the_environment_or_a_file(tmp_path):
    assert gateway_settings_from_args(parse_args(["serve"], {"STREAMVLM_API_KEY": "k1"})).api_key == "k1"
    key_file = tmp_path / "key"
    key_file.write_text("k2\n")
    args = parse_args(["serve", "--api-key-file", str(key_file)], {})
    assert gateway_settings_from_args(args).api_key == "k2"
    args = parse_args(["serve"], {"STREAMVLM_API_KEY_FILE": str(key_file)})
    assert gateway_settings_from_args(args).api_key == "k2"
    with pytest.raises(ValueError, match="one way"):
        gateway_settings_from_args(parse_args(["serve", "--api-key-file", str(key_file)],
                                              {"STREAMVLM_API_KEY": "k1"}))
    with pytest.raises(ValueError, match="cannot read"):
        gateway_settings_from_args(parse_args(["serve", "--api-key-file", str(tmp_path / "no")], {}))


def _help(*command: str) -> str:
    done = subprocess.run([sys.executable, "-m", "streamvlm.cli", *command, "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "COLUMNS": "400", "PATH": ""})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _option_help(text: str) -> dict[str, str]:
    """--flag -> its help text, from argparse's option lines (the help on the same line, or on
    the next when the option strings are long)."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"  (--[a-z0-9-]+)(?:, --no-[a-z0-9-]+)?(?: (?:\{[^}]*\}|[A-Z_,.]+))?"
                         r"(?:\s{2,}(.*))?$", line)
        if match:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            following = "" if following.lstrip().startswith("-") else following
            found[match.group(1)] = (match.group(2) or following).strip()
    return found


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_help_describes_every_engine_flag(command):
    text = _help(command)
    assert "NODEFAULT" not in text
    options = _option_help(text)
    for section in SECTIONS.values():
        for field in msgspec.structs.fields(section):
            flag = "--" + field.name.replace("_", "-")
            assert options.get(flag, "").split("(default:")[0].strip(), f"{flag} has no help"
            assert "(default: " in options[flag], flag
            if typing.get_origin(field.type) is typing.Literal:
                choices = "{" + ",".join(typing.get_args(field.type)) + "}"
                assert re.search(rf"{flag} {re.escape(choices)}\s", text), flag


def test_serve_help_shows_host_and_port_defaults_and_generate_uses_sampling_names():
    serve = _option_help(_help("serve"))
    assert "(default: 127.0.0.1)" in serve["--host"] and "(default: 8000)" in serve["--port"]
    generate = _option_help(_help("generate"))
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "stop_token_ids", "skip_special_tokens"):
        assert generate["--" + name.replace("_", "-")], name
    assert "NODEFAULT" not in _help("worker")


def test_a_bad_environment_value_fails_serve_at_once():
    done = subprocess.run([sys.executable, "-m", "streamvlm.cli", "serve", "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "STREAMVLM_BLOCK_SIZE": "big"})
    assert done.returncode == 2
    assert "STREAMVLM_BLOCK_SIZE='big'" in done.stderr


TEMPLATE = ("{% for m in messages %}<<{{ m['role'] | upper }}>> {{ m['content'] }}\n{% endfor %}"
            "<<ASSISTANT>>")


@pytest.mark.parametrize("as_file", [True, False])
def test_a_chat_template_replaces_the_checkpoints(llama_path, tmp_path, loop, as_file):
    from streamvlm import AsyncEngine

    value = TEMPLATE
    if as_file:
        (tmp_path / "template.jinja").write_text(TEMPLATE)
        value = str(tmp_path / "template.jinja")
    args = parse_args(["generate", "x", "--model", str(llama_path), "--max-model-len", "256",
                       "--worker-backend", "thread", "--chat-template", value], {})
    engine = AsyncEngine(engine_config_from_args(args))
    prepared = loop.run_until_complete(engine.prepare_prompt([{"role": "user", "content": "hi"}]))
    assert engine.tokenizer.decode(prepared.prompt_token_ids) == "<<USER>> hi\n<<ASSISTANT>>"


def test_a_missing_chat_template_file_is_refused_at_start(llama_path, tmp_path):
    from streamvlm import AsyncEngine, EngineConfig

    with pytest.raises(ValueError, match="chat_template.*no such file"):
        AsyncEngine(EngineConfig(model=str(llama_path), worker_backend="thread",
                                 chat_template=str(tmp_path / "missing.jinja")))
    big = tmp_path / "big.jinja"
    big.write_text("x" * (2 << 20))
    with pytest.raises(ValueError, match="chat_template.*bytes"):
        AsyncEngine(EngineConfig(model=str(llama_path), worker_backend="thread",
                                 chat_template=str(big)))
