"""Config loading, overrides and the CLI's job-level error handling (no Ray needed)."""

from __future__ import annotations

import re
import typing

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_fixtures import REPO, run_cli
from pipelines import cli
from pipelines.config import (
    ConfigError,
    PipelineConfig,
    apply_job,
    config_keys,
    list_item_class,
    load_config,
    parse_override,
)


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out |= _flat_keys(v, key + ".")
        else:
            out.add(key)
    return out


def test_pipeline_yaml_mirrors_the_defaults():
    text = (REPO / "conf" / "pipeline.yaml").read_text()
    assert load_config(REPO / "conf" / "pipeline.yaml") == PipelineConfig()
    # every key is spelled out (and so documented) in the file; a list section (heads) as its name
    hints = typing.get_type_hints(PipelineConfig)
    expected = {k.split(".")[0] if list_item_class(hints[k.split(".")[0]]) else k for k, _, _ in config_keys()}
    assert _flat_keys(yaml.safe_load(text)) == expected


@pytest.mark.parametrize("name", ["embed", "label", "caption", "index"])
def test_every_job_config_loads(name):
    cfg = load_config(REPO / "conf" / f"{name}.yaml")
    assert cfg.model.checkpoint == "demo"


def test_every_key_is_documented():
    docs = [p for p in (REPO / "docs" / "pipeline.md", REPO / "README.md") if p.exists()]
    text = "\n".join(p.read_text() for p in docs)
    missing = [k for k, _, _ in config_keys() if f"`{k}`" not in text]
    assert docs and not missing, f"keys missing from {[p.name for p in docs]}: {missing}"


def test_overrides_parse_by_field_type():
    cfg = load_config(None, [
        "input.path=s3://bucket/m.parquet",
        "label.classes=[cat, dog]",
        "index.enabled=false",
        "embed.batch_size=16",
        "embed.num_gpus=0.5",
        "index.target_recall=0.9",
        "model.checkpoint=123",  # a string field keeps the text
        "label.templates=null",
        "input.max_rows=10",
    ])
    assert cfg.input.path == "s3://bucket/m.parquet"
    assert cfg.label.classes == ["cat", "dog"]
    assert cfg.index.enabled is False
    assert cfg.embed.batch_size == 16 and cfg.embed.num_gpus == 0.5
    assert cfg.index.target_recall == 0.9
    assert cfg.model.checkpoint == "123"
    assert cfg.label.templates is None and cfg.input.max_rows == 10
    assert parse_override("decode.num_cpus=2") == ("decode.num_cpus", 2)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("embed:\n  batch_size: 8\n  actors: 3\nlabel:\n  classes: [a, b]\n")
    cfg = load_config(path, ["embed.actors=2"])
    assert (cfg.embed.batch_size, cfg.embed.actors, cfg.label.classes) == (8, 2, ["a", "b"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["label.clases=[a]"], r"unknown config key 'label\.clases' \(did you mean 'label\.classes'\?\)"),
        (["nosuch.key=1"], r"unknown config key 'nosuch\.key'"),
        (["embed.batch_size=lots"], r"'embed\.batch_size' must be 'auto' or an integer"),
        (["index.enabled=maybe"], r"'index\.enabled' must be true/false"),
        (["label.classes={a: 1}"], r"'label\.classes' must be a string or a list of strings"),
        (["model.backend=tensorflow"], r"'model\.backend' must be one of"),
        (["embed.batch_size=0"], r"'embed\.batch_size' must be >= 1"),
        (["embed=3"], r"'embed' is a section"),
        (["input.path"], r"must look like section\.key=value"),
        (["embed.num_gpus=many"], r"'embed\.num_gpus' must be 'auto' or a number"),
    ],
)
def test_bad_overrides_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_bad_file_keys_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("embed:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'embed\.batch_sise'"):
        load_config(path)
    path.write_text("embed:\n  batch_size: [8]\n")
    with pytest.raises(ConfigError, match=r"'embed\.batch_size' must be an integer"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_subcommands_switch_stages():
    cfg = PipelineConfig()
    assert (cfg.label.enabled, cfg.caption.enabled, cfg.index.enabled) == (True, True, True)
    e = apply_job(cfg, "embed")
    assert (e.label.enabled, e.caption.enabled, e.index.enabled) == (False, False, False)
    lab = apply_job(cfg, "label")
    assert (lab.label.enabled, lab.caption.enabled, lab.index.enabled) == (True, False, False)
    cap = apply_job(cfg, "caption")
    assert (cap.label.enabled, cap.caption.enabled, cap.index.enabled) == (False, True, False)
    assert cfg == PipelineConfig()  # not mutated


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("clip-etl: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_bad_config_exits_2_with_one_line(capsys):
    assert cli.main(["run", "label.clases=[a]"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "label.clases" in line


def test_cli_missing_input_path(capsys):
    assert cli.main(["run", "index.enabled=false"]) == 2
    assert "input.path" in _one_line_error(capsys.readouterr().err)


def test_cli_unreadable_manifest(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert cli.main(["run", f"input.path={bad}", f"output.path={tmp_path / 'out'}"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "bad.parquet" in line
    assert cli.main(["run", f"input.path={tmp_path / 'nope.parquet'}", f"output.path={tmp_path / 'out'}"]) == 1
    assert "manifest not found" in _one_line_error(capsys.readouterr().err)


def test_cli_manifest_without_usable_columns(tmp_path, capsys):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "picture": ["x.jpg"]}), path)
    assert cli.main(["run", f"input.path={path}", f"output.path={tmp_path / 'out'}"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "'image'" in line and "'text'" in line and "picture" in line


def test_cli_duplicate_ids(tmp_path, capsys):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "a"], "text": ["x", "y", "z"]}), path)
    assert cli.main(["run", f"input.path={path}", f"output.path={tmp_path / 'out'}"]) == 1
    assert "duplicate" in _one_line_error(capsys.readouterr().err)


def test_cli_unloadable_model_exits_nonzero(tmp_path):
    """The installed console script, as a real process: one clear line, non-zero status."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"text": ["a cat"]}), path)
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"garbage")
    proc = run_cli(["run", f"input.path={path}", f"output.path={tmp_path / 'out'}",
                    f"model.checkpoint={junk}"], timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = _one_line_error(proc.stderr)
    assert "cannot load model" in line and "model.safetensors" in line
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_print_config(capsys):
    assert cli.main(["embed", "--print-config", "input.path=m.parquet"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["input"]["path"] == "m.parquet" and data["label"]["enabled"] is False


def test_tools_are_registered_lazily(capsys):
    parser = cli.build_parser()
    names = set(re.findall(r"^    (\w+)", parser.format_help(), re.M))
    assert {"run", "embed", "label", "caption", "index", "search", "train", "export", "demo"} <= names


@pytest.mark.parametrize("tool,flag", [("search", "--text"), ("train", "--steps"), ("export", "--format"),
                                       ("demo", "--n")])
def test_every_tool_has_help(tool, flag, capsys):
    assert cli.main([tool, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: clip-etl {tool}") and flag in out


def test_embed_batch_size_auto_is_larger_for_texts_alone():
    from pipelines.etl.embed import resolve_batch_size

    assert load_config(None, []).embed.batch_size == "auto"
    assert resolve_batch_size("auto", images=True) == 32 and resolve_batch_size("auto", images=True, gpu=True) == 64
    assert resolve_batch_size("auto", images=False) == 256
    assert resolve_batch_size(16, images=False) == 16
