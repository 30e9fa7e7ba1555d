"""``docs/configuration.md`` is generated from the config dataclasses and stays in sync with them,
and every ``section.key`` the docs and configs mention is a real key."""

from __future__ import annotations

import re

import pytest

from pipeline_fixtures import REPO
from pipelines import config_reference as ref
from pipelines.config import PipelineConfig, config_keys

REFERENCE = REPO / ref.DEFAULT_PATH
KEYS = {k for k, _, _ in config_keys()}
SECTIONS = sorted({k.split(".")[0] for k in KEYS})

# A dotted name starting with a section name that is not a config key, by design.
NOT_CONFIG_KEYS = {
    "label.clases": "the misspelt key of the unknown-key error example",
    "ray.remote": "Ray's API",
}
# "index.json" and "conf/index.yaml" are files: a name whose second part is one of these suffixes.
FILE_SUFFIXES = {"json", "yaml", "yml", "md", "py", "parquet", "txt", "faiss", "npy", "pt", "onnx", "safetensors"}
# section.name, not inside a longer dotted name or path (ray.job_submission.JobSubmissionClient,
# benchmarks/index.py) and not a call (ray.remote(...)).
MENTION = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[A-Za-z_]\w*)(?![\w(/-]|\.\w)")


def _documents():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "conf").glob("*.yaml"))]


def mentioned_keys() -> dict[str, list[str]]:
    """``section.key`` mentions in README.md, docs/*.md and conf/*.yaml -> ["file:line", ...]."""
    found: dict[str, list[str]] = {}
    for path in _documents():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for match in MENTION.finditer(line):
                key = match.group(1)
                if key.split(".")[1] in FILE_SUFFIXES or key in NOT_CONFIG_KEYS:
                    continue
                found.setdefault(key, []).append(f"{path.relative_to(REPO)}:{number}")
    return found


def _reference_keys(text: str) -> set[str]:
    return set(re.findall(r"^\| `([a-z0-9_]+\.[a-z0-9_]+)` \|", text, flags=re.M))


def test_configuration_md_is_in_sync_with_the_dataclasses():
    current = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    documented = _reference_keys(current)
    missing, stale = sorted(KEYS - documented), sorted(documented - KEYS)
    assert not missing and not stale, (
        f"{ref.DEFAULT_PATH} lacks {missing} and documents keys that do not exist {stale}; run: {ref.COMMAND}")
    assert current == ref.render(), f"{ref.DEFAULT_PATH} is out of date; run: {ref.COMMAND}"


def test_every_key_has_a_meaning_and_every_section_an_intro():
    for section in ref.sections():
        assert section.intro, f"the {section.name} section's dataclass has no docstring"
        for key in section.keys:
            assert key.meaning, f"{key.key} has no '# ...' comment above its field in pipelines/config.py"


def test_meanings_are_the_comment_lines_above_each_field():
    keys = {k.key: k for s in ref.sections() for k in s.keys}
    assert keys["input.path"].meaning == (
        "Manifest Parquet: a file, a directory (all *.parquet below it), a glob, an s3:// URI of any of "
        "those, or a list of them. Required.")
    assert keys["index.memory_budget_gb"].meaning == "Memory the search side may use for one shard, in GiB."
    assert keys["index.memory_budget_gb"].default == PipelineConfig().index.memory_budget_gb
    text = ref.render()
    assert "| `label.top_k` | integer | `5` | How many classes labels_topk / scores_topk keep. |" in text
    assert "| `model.backend` | string | `auto` | auto \\| torch \\| torchscript" in text  # "|" escaped in a cell
    assert "| `s3.anonymous` | true/false | `false` |" in text


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(ref.render().replace("`index.merge`", "`index.merged`"))
    assert ref.main(["--check", str(stale)]) == 1
    assert ref.COMMAND in capsys.readouterr().err
    assert ref.main(["--write", str(stale)]) == 0 and ref.main(["--check", str(stale)]) == 0


def test_every_key_the_docs_mention_exists():
    found = mentioned_keys()
    unknown = {k: where for k, where in found.items() if k not in KEYS}
    assert not unknown, "documented keys that do not exist: " + "; ".join(
        f"{k} ({', '.join(where)})" for k, where in sorted(unknown.items()))


@pytest.mark.parametrize("line, expected", [
    ("set `index.memory_budget_gb` lower", ["index.memory_budget_gb"]),
    ("clip-etl run input.path=s3://b/m.parquet model.backend=onnx", ["input.path", "model.backend"]),
    ("| `index.id_column` | `id` |", ["index.id_column"]),
    ("written last to `index.json`, see benchmarks/index.py and conf/label.yaml", []),
    ("`ray.job_submission.JobSubmissionClient` and ray.remote(f)", []),
])
def test_what_counts_as_a_mention(line, expected):
    assert [m.group(1) for m in MENTION.finditer(line)
            if m.group(1).split(".")[1] not in FILE_SUFFIXES] == expected


def test_the_file_rule_hides_no_real_key():
    assert not [k for k in KEYS if k.split(".")[1] in FILE_SUFFIXES]
    assert not set(NOT_CONFIG_KEYS) & KEYS
