"""`rlhf validate` and `rlhf render`: every bad file gets one error naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf_operator import cli, spec_checks

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "data" / "bad"

# file -> what the error must name (the field path, and the gist of the problem)
EXPECTED = {
    "missing-model.yaml": ["spec.model", "required"],
    "duplicate-stage.yaml": ["spec.stages[1].name", "duplicate stage name 'sft'"],
    "unknown-from.yaml": ["spec.stages[1].from", "'sfft' is not an earlier stage"],
    "negative-lr.yaml": ["spec.stages[0].hyperparameters.learningRate", "greater than 0"],
    "unknown-type.yaml": ["spec.stages[0].type", "'sft'"],
    "malformed.yaml": ["line 8", "malformed YAML"],
    "unknown-field.yaml": ["spec.stages[0].hyperparameter", "unknown field"],
    "ppo-without-reward.yaml": ["spec.stages[0]", "needs `reward`"],
    "two-model-sources.yaml": ["spec.model", "exactly one of `name`"],
    "feedback-without-judge.yaml": ["spec.stages[0]", "`spec.judge` must be set"],
}


def test_every_bad_file_is_covered() -> None:
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_is_refused_naming_the_field(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = BAD / name
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(str(path) + ":"), "the error names the file"
    for needle in EXPECTED[name]:
        assert needle in err, f"{needle!r} missing from: {err}"
    assert "Traceback" not in err


def test_validate_many_files_reports_each_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    good = ROOT / "examples" / "quickstart.yaml"
    bad = [BAD / "negative-lr.yaml", BAD / "unknown-from.yaml"]
    assert cli.main(["validate", str(good), *map(str, bad)]) == 1
    out = capsys.readouterr()
    assert "quickstart.yaml: valid" in out.out
    assert all(str(b) in out.err for b in bad)


def test_validate_good_example_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(ROOT / "examples" / "quickstart.yaml")]) == 0
    assert "valid (quickstart)" in capsys.readouterr().out


def test_missing_file_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "does/not/exist.yaml"]) == 1
    assert "does/not/exist.yaml: cannot read" in capsys.readouterr().err


def test_render_prints_configmap_and_pytorchjob(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["render", str(ROOT / "examples" / "quickstart.yaml")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    config = yaml.safe_load(docs[0]["data"]["sft.yaml"])
    assert config["outputDir"] == "quickstart/sft"
    command = docs[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][
        0
    ]["command"]
    assert command[0] == "torchrun"
    assert command[-2:] == ["--config", "/etc/rlhf/sft.yaml"]


def test_render_of_unsupported_stage_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spec_checks, "SUPPORTED_STAGE_TYPES", frozenset({"sft"}))
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["stages"][0]["type"] = "dpo"
    doc["spec"]["stages"][0]["dataset"]["format"] = "preference"  # what a dpo stage reads
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["render", str(path)]) == 1
    assert "'dpo' is not supported yet" in capsys.readouterr().err


def test_render_says_the_operator_fills_the_owner_uid(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["render", str(ROOT / "examples" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ownerReferences[].uid is empty here: the operator fills in")
    assert "--no-owner-references" in out.splitlines()[1]
    docs = list(yaml.safe_load_all(out))
    assert all(d["metadata"]["ownerReferences"][0]["uid"] == "" for d in docs)


def test_render_without_owner_references_applies_with_kubectl(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kubernetes_validate

    path = str(ROOT / "examples" / "quickstart.yaml")
    assert cli.main(["render", "--no-owner-references", path]) == 0
    out = capsys.readouterr().out
    assert not out.startswith("#")
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    assert all("ownerReferences" not in d["metadata"] for d in docs)
    assert docs[1]["metadata"]["labels"]["rlhf.dev/run"] == "quickstart"
    kubernetes_validate.validate(docs[0], "1.34", strict=True)


def test_render_keeps_a_uid_the_file_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["metadata"]["uid"] = "6f1c0d7e-0000-4000-8000-000000000001"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["render", str(path)]) == 0
    out = capsys.readouterr().out
    assert not out.startswith("#")
    assert all(d["metadata"]["ownerReferences"][0]["uid"] == doc["metadata"]["uid"]
               for d in yaml.safe_load_all(out))  # fmt: skip


def test_a_binary_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\xd0\xff" * 16)
    assert cli.main(["validate", str(binary)]) == 1
    err = capsys.readouterr().err
    assert "not a text file (byte 2 is not UTF-8)" in err and "Traceback" not in err


def test_a_bom_in_the_spec_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).parents[2] / "manifests" / "examples" / "quickstart.yaml").read_text()
    spec = tmp_path / "bom.yaml"
    spec.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert cli.main(["validate", str(spec)]) == 0, capsys.readouterr().err


def test_the_operator_without_a_cluster_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No in-cluster service account and no kubeconfig: one line naming $KUBECONFIG, exit 1,
    and no operator half started (no traceback, no metrics server)."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["operator", "--all-namespaces", "--metrics-port", "0"]) == 1
    err = capsys.readouterr().err
    assert "kubeconfig: no cluster to talk to" in err and "set $KUBECONFIG" in err


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--batch-size", "--max-length"])
def test_eval_refuses_a_count_below_one_naming_the_flag(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "manifests/examples/quickstart.yaml", flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: 0 is not at least 1" in capsys.readouterr().err
