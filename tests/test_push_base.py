"""``push`` names the base as ``export`` does, through the real CLI against the test Hub: the
pushed ``adapter_config.json`` holds the recorded base's Hub repo id (or ``--base-model-id``,
else null), never the training machine's local path; ``lorahub.json`` records the rewrite, so
a pull restores the stored value and the digest, and pushing again makes no commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import cli_runner, fake_hf_cache, peft_adapter, tiny_llama
from huggingface_hub import ModelCard, snapshot_download

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TRAINER_PATH = "/home/trainer/models/llama"
BASE_KEY = "base_model_name_or_path"


@pytest.fixture
def server(alice_hub):
    return alice_hub


@pytest.fixture
def trained(tmp_path) -> Path:
    """A tiny Llama adapter whose config names the training machine's folder as its base."""
    src = tmp_path / "src"
    peft_adapter(tiny_llama(), src, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config_path = src / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, BASE_KEY: TRAINER_PATH}))
    return src


@pytest.fixture
def cached_base(world, tmp_path, monkeypatch) -> str:
    """The tiny Llama as the Hub repo ``acme/tiny-llama`` in the Hugging Face cache (for
    ``--base``), laid out as ``hf download`` leaves it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    fake_hf_cache(tmp_path / "hf-home", "acme/tiny-llama", world / "llama")
    return "acme/tiny-llama"


def pushed(server, repo: str) -> tuple[dict, dict, ModelCard, dict[str, bytes]]:
    """The pushed config, lorahub.json and card of ``repo``, and all its files."""
    files = server.repo_files(repo)
    config = json.loads(files["adapter_config.json"])
    doc = json.loads(files["lorahub.json"])
    return config, doc, ModelCard(files["README.md"].decode()), files


def digest(run, ref: str) -> str:
    return json.loads(run("show", ref, "--json").output)["digest"]


def test_a_local_base_path_is_pushed_as_null_and_pulled_back(server, trained, tmp_path):
    run = cli_runner(tmp_path / "home")
    run("add", trained, "-n", "sql:v1")
    original = digest(run, "sql:v1")
    run("push", "sql:v1", "myorg/sql")

    config, doc, card, files = pushed(server, "myorg/sql")
    assert config[BASE_KEY] is None
    assert TRAINER_PATH.encode() not in files["adapter_config.json"] + files["README.md"]
    assert card.data.base_model is None
    assert doc["rewritten"] == {BASE_KEY: None}

    # The same adapter pushed again: every file is the same, no commit.
    again = json.loads(run("push", "sql:v1", "myorg/sql", "--json").output)
    assert again["committed"] is False and again["files_uploaded"] == []

    # Pulled into another store: the stored config comes back, and so does the digest.
    other = cli_runner(tmp_path / "home-b")
    other("pull", "myorg/sql", "--name", "sql:v1")
    assert digest(other, "sql:v1") == original
    shown = json.loads(other("show", "sql:v1", "--json").output)
    assert shown["manifest"]["config"][BASE_KEY] == TRAINER_PATH
    # ... and pushed back from there, it is still the same repo: no commit.
    back = json.loads(other("push", "sql:v1", "myorg/sql", "--json").output)
    assert back["committed"] is False

    # The pushed repo, as it is, loads in PEFT.
    repo = snapshot_download("myorg/sql", endpoint=server.url)
    from peft import PeftModel

    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(), str(trained)).eval()(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(tiny_llama(), repo).eval()
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_recorded_base_repo_id_is_pushed(server, trained, cached_base, world, tmp_path):
    run = cli_runner(tmp_path / "home")
    run("add", trained, "--base", cached_base, "-n", "sql:v1")
    original = digest(run, "sql:v1")
    run("push", "sql:v1", "myorg/sql")

    config, doc, card, files = pushed(server, "myorg/sql")
    assert config[BASE_KEY] == cached_base
    assert card.data.base_model == cached_base
    assert doc["rewritten"] == {BASE_KEY: cached_base}
    assert TRAINER_PATH.encode() not in files["adapter_config.json"] + files["README.md"]
    assert json.loads(run("push", "sql:v1", "myorg/sql", "--json").output)["committed"] is False

    other = cli_runner(tmp_path / "home-b")
    other("pull", "myorg/sql", "--name", "sql:v1")
    assert digest(other, "sql:v1") == original

    # What the issue was about: AutoPeftModel loads the repo alone, its base from the Hub.
    server.seed_repo(
        cached_base, {f.name: f.read_bytes() for f in (world / "llama").iterdir() if f.is_file()}
    )
    from peft import AutoPeftModelForCausalLM, PeftModel

    repo = snapshot_download("myorg/sql", endpoint=server.url)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = (
            PeftModel.from_pretrained(tiny_llama(seed=0), str(trained)).eval()(input_ids=ids).logits
        )
        got = AutoPeftModelForCausalLM.from_pretrained(repo).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_base_model_id_sets_the_pushed_base(server, trained, tmp_path):
    run = cli_runner(tmp_path / "home")
    run("add", trained, "-n", "sql:v1")
    original = digest(run, "sql:v1")
    run("push", "sql:v1", "myorg/sql", "--base-model-id", "org/x")

    config, doc, card, _ = pushed(server, "myorg/sql")
    assert config[BASE_KEY] == "org/x"
    assert card.data.base_model == "org/x" and card.data.get("base_model_relation") == "adapter"
    assert 'from_pretrained("org/x")' in card.text
    assert doc["rewritten"] == {BASE_KEY: "org/x"}

    other = cli_runner(tmp_path / "home-b")
    other("pull", "myorg/sql", "--name", "sql:v1")
    assert digest(other, "sql:v1") == original
    back = other("push", "sql:v1", "myorg/sql", "--base-model-id", "org/x", "--json")
    assert json.loads(back.output)["committed"] is False

    # Not a repo id: refused before anything is pushed.
    bad = run("push", "sql:v1", "myorg/bad", "--base-model-id", TRAINER_PATH, code=None)
    assert bad.exit_code != 0 and "not a Hub repo id" in bad.output + bad.stderr
    assert "Traceback" not in bad.output + bad.stderr
    with pytest.raises(KeyError, match="no model repo"):  # the repo was never created
        server.repo_files("myorg/bad")


def test_hub_push_takes_base_model_id(server, trained, tmp_path):
    import lorahub

    with lorahub.open(tmp_path / "home") as hub:
        hub.add(trained, name="sql:v1")
        result = hub.push("sql:v1", "myorg/api", base_model_id="acme/llama")
    assert result.committed
    config, doc, _, _ = pushed(server, "myorg/api")
    assert config[BASE_KEY] == "acme/llama" and doc["rewritten"] == {BASE_KEY: "acme/llama"}
