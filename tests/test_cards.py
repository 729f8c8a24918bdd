"""Model cards through the real CLI: the original README kept at ``add``/``pull`` and carried
into pushed (read back from the test Hub) and exported cards, ``base_model`` only ever a Hub
repo id, merged checkpoints' cards, and ``export --base-model-id`` with PEFT loading the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import cli_runner, fake_hf_cache, peft_adapter, tiny_llama, write_peft_adapter
from huggingface_hub import ModelCard

from lorahub.card import is_repo_id

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TRAINER_PATH = "/home/trainer/models/llama"
ORIGINAL = f"""---
license: apache-2.0
datasets:
- myorg/sql-pairs
language:
- en
tags:
- sql
- base_model:adapter:{TRAINER_PATH}
base_model: {TRAINER_PATH}
---

# SQL expert

Trained on sql-pairs for two epochs.
"""


@pytest.fixture
def server(alice_hub):
    return alice_hub


def sql_adapter(folder: Path, card: str | None = ORIGINAL, **config) -> Path:
    """A PEFT folder trained from a local path, with its model card."""
    src = write_peft_adapter(
        folder, extra_config={"base_model_name_or_path": TRAINER_PATH, **config}
    )
    if card is not None:
        (src / "README.md").write_text(card)
    return src


def card(text: str | bytes) -> ModelCard:
    return ModelCard(text.decode() if isinstance(text, bytes) else text)


def assert_original_metadata(c: ModelCard) -> None:
    assert c.data.license == "apache-2.0"
    assert c.data.datasets == ["myorg/sql-pairs"]
    assert c.data.language == ["en"]
    assert c.data.library_name == "peft"
    assert c.data.pipeline_tag == "text-generation"  # from task_type CAUSAL_LM
    assert "sql" in c.data.tags and "lora" in c.data.tags
    assert not [t for t in c.data.tags if t.startswith("base_model:")]
    assert "Trained on sql-pairs for two epochs." in c.text


def test_the_original_card_survives_add_push_and_export(server, tmp_path):
    run = cli_runner(tmp_path / "home")
    run("add", sql_adapter(tmp_path / "src"), "-n", "sql:v1")
    run("push", "sql:v1", "myorg/sql")

    pushed = server.repo_files("myorg/sql")["README.md"].decode()
    c = card(pushed)
    assert_original_metadata(c)
    # Only a local path is known for the base: no base_model at all, never the path.
    assert c.data.base_model is None and c.data.get("base_model_relation") is None
    assert TRAINER_PATH not in pushed
    assert 'PeftModel.from_pretrained(base, "myorg/sql")' in c.text
    assert "pypi.org" not in pushed

    run("export", "sql:v1", tmp_path / "out")
    exported = (tmp_path / "out" / "README.md").read_text()
    assert_original_metadata(card(exported))
    assert TRAINER_PATH not in exported and "pypi.org" not in exported
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # the training machine's path is gone

    # The export imports again as the same adapter, with its card, and exports identically:
    # lorahub's own section is not nested inside the kept card.
    other = cli_runner(tmp_path / "home-b")
    digest = json.loads(run("show", "sql:v1", "--json").output)["digest"]
    other("add", tmp_path / "out", "-n", "sql:v1")
    assert json.loads(other("show", "sql:v1", "--json").output)["digest"] == digest
    other("export", "sql:v1", tmp_path / "out-b")
    assert (tmp_path / "out-b" / "README.md").read_text() == exported


def test_a_pulled_repo_card_goes_into_the_next_push(server, tmp_path):
    src = sql_adapter(tmp_path / "src", card=None, base_model_name_or_path="tiny/llama")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    readme = "---\nlicense: mit\ndatasets: [someone/data]\n---\n\nA card written on the Hub.\n"
    server.seed_repo("someone/peft-sql", files | {"README.md": readme.encode()})

    run = cli_runner(tmp_path / "home")
    run("pull", "someone/peft-sql", "--name", "sql:v1")
    run("push", "sql:v1", "myorg/copy")

    c = card(server.repo_files("myorg/copy")["README.md"])
    assert c.data.license == "mit" and c.data.datasets == ["someone/data"]
    assert "A card written on the Hub." in c.text
    assert c.data.base_model == "tiny/llama" and c.data.get("base_model_relation") == "adapter"
    assert 'AutoModelForCausalLM.from_pretrained("tiny/llama")' in c.text
    assert 'PeftModel.from_pretrained(base, "myorg/copy")' in c.text

    # Pulled from there and pushed back, every file is the same: no commit.
    again = cli_runner(tmp_path / "home-b")
    again("pull", "myorg/copy", "--name", "sql:v1")
    pushed = json.loads(again("push", "sql:v1", "myorg/copy", "--json").output)
    assert pushed["committed"] is False, "the card of a pulled lorahub push came back changed"


def test_a_card_lorahub_wrote_alone_is_not_kept(server, tmp_path):
    run = cli_runner(tmp_path / "home")
    run("add", sql_adapter(tmp_path / "src", card=None), "-n", "plain:v1")
    run("push", "plain:v1", "myorg/plain")
    other = cli_runner(tmp_path / "home-b")
    other("pull", "myorg/plain", "--name", "plain:v1")
    shown = json.loads(other("show", "plain:v1", "--json").output)
    assert shown["card"] is None and shown["card_bytes"] is None


@pytest.mark.parametrize(
    ("config_base", "card_base", "expected"),
    [
        ("/home/me/llama", None, None),
        ("./models/llama", None, None),
        ("~/llama", None, None),
        ("C:\\models\\llama", None, None),
        ("llama-local", None, None),  # a bare name: as likely a folder as a legacy repo id
        ("/abs/llama", "/abs/llama", None),  # the original card's path is dropped too
        ("/abs/llama", "acme/llama", "acme/llama"),  # its repo id is kept
        ("acme/llama-3", None, "acme/llama-3"),
    ],
)
def test_base_model_is_a_repo_id_never_a_path(tmp_path, config_base, card_base, expected):
    run = cli_runner(tmp_path / "home")
    original = f"---\nbase_model: {json.dumps(card_base)}\n---\n\nText.\n" if card_base else None
    run("add", sql_adapter(tmp_path / "src", card=original, base_model_name_or_path=config_base))
    digest = json.loads(run("ls", "--json").output)[0]["digest"]
    run("export", f"@{digest}", tmp_path / "out")
    c = card((tmp_path / "out" / "README.md").read_text())
    assert c.data.base_model == expected
    assert c.data.get("base_model_relation") == ("adapter" if expected else None)
    if config_base.startswith(("/", "~", ".", "C:")):
        assert config_base not in (tmp_path / "out" / "README.md").read_text()
        written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert written["base_model_name_or_path"] is None


def test_is_repo_id():
    assert is_repo_id("meta-llama/Llama-3.1-8B")
    for bad in ("/models/llama", "models/../x", "llama", "a/b/c", "./x/y", "x/.y", "a--b/c", ""):
        assert not is_repo_id(bad), bad


def test_export_base_model_id_rewrites_the_config_and_peft_loads_it(tmp_path):
    from peft import PeftModel

    src = tmp_path / "src"
    peft_adapter(tiny_llama(), src, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config_path = src / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": TRAINER_PATH}))
    run = cli_runner(tmp_path / "home")
    run("add", src, "-n", "tl:v1")
    digest = json.loads(run("show", "tl:v1", "--json").output)["digest"]

    out = tmp_path / "out"
    run("export", "tl:v1", out, "--base-model-id", "acme/tiny-llama")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "acme/tiny-llama"
    c = card((out / "README.md").read_text())
    assert c.data.base_model == "acme/tiny-llama" and c.data.get("base_model_relation") == "adapter"
    assert '.from_pretrained("acme/tiny-llama")' in c.text  # no task_type: AutoModel
    assert json.loads((out / "lorahub.json").read_text())["rewritten"] == {
        "base_model_name_or_path": "acme/tiny-llama"
    }

    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(), str(src)).eval()(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
        got = loaded(input_ids=ids).logits
    assert loaded.peft_config["default"].base_model_name_or_path == "acme/tiny-llama"
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    # Imported again, the stored config comes back: the same adapter, the same digest.
    other = cli_runner(tmp_path / "home-b")
    other("add", out, "-n", "tl:v1")
    shown = json.loads(other("show", "tl:v1", "--json").output)
    assert shown["digest"] == digest
    # ... but one edited further is refused, as any edited export is.
    written["base_model_name_or_path"] = "acme/other"
    (out / "adapter_config.json").write_text(json.dumps(written))
    refused = cli_runner(tmp_path / "home-c")("add", out, code=None)
    assert refused.exit_code != 0 and "do not match lorahub.json" in refused.output + refused.stderr

    bad = run("export", "tl:v1", tmp_path / "bad", "--base-model-id", "/not/a/repo", code=None)
    assert bad.exit_code != 0 and "not a Hub repo id" in bad.output + bad.stderr
    assert not (tmp_path / "bad").exists()
    usage = run(
        "export", "--layout", "vllm", tmp_path / "v", "--base-model-id", "acme/x", code=None
    )
    assert usage.exit_code == 2


@pytest.fixture
def hub_base(world, tmp_path, monkeypatch) -> str:
    """The tiny Llama as the Hub repo ``acme/tiny-llama`` in the Hugging Face cache, with a
    model card of its own."""
    model = tmp_path / "acme-model"
    model.mkdir()
    for f in (world / "llama").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "README.md").write_text("---\nlicense: llama3.2\nlanguage: [en, de]\n---\n\nBase.\n")
    hf_home = tmp_path / "hf-home"  # the HF_HOME of every test (conftest)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    fake_hf_cache(hf_home, "acme/tiny-llama", model)
    return "acme/tiny-llama"


def test_export_defaults_to_the_recorded_base_repo_id(hub_base, world, tmp_path):
    run = cli_runner(tmp_path / "home")
    run("add", world / "a", "--base", hub_base, "-n", "a:v1")
    run("export", "a:v1", tmp_path / "out")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == hub_base
    c = card((tmp_path / "out" / "README.md").read_text())
    assert c.data.base_model == hub_base and c.data.get("base_model_relation") == "adapter"


def test_a_merged_checkpoint_has_a_merge_card(hub_base, world, tmp_path):
    run = cli_runner(tmp_path / "home")
    run("add", world / "a", "-n", "a:v1")
    digest = json.loads(run("show", "a:v1", "--json").output)["digest"]
    out = tmp_path / "merged"
    run("merge", hub_base, "a:v1", "-o", out, "--device", "cpu", "-w", "0.5")

    text = (out / "README.md").read_text()
    c = card(text)
    assert c.data.base_model == hub_base and c.data.get("base_model_relation") == "merge"
    assert c.data.license == "llama3.2" and c.data.language == ["en", "de"]  # the base's terms
    assert c.data.library_name == "transformers"
    assert digest in text and "a:v1" in text and "weight 0.5" in text
    assert "README.md" in json.loads((out / "lorahub.json").read_text())["files"]

    # A local base folder: still a merge card, and no local path anywhere in it.
    local = tmp_path / "merged-local"
    run("merge", world / "llama", "a:v1", "-o", local, "--device", "cpu")
    text = (local / "README.md").read_text()
    c = card(text)
    assert c.data.get("base_model_relation") == "merge" and c.data.base_model is None
    assert str(world) not in text


def test_the_kept_card_survives_a_rebuilt_catalog(run, store_home, tmp_path):
    run("add", sql_adapter(tmp_path / "src"), "-n", "sql:v1")
    (store_home / "lorahub.db").unlink()  # the catalog is lost: fsck rebuilds it from records
    run("fsck")
    run("export", "sql:v1", tmp_path / "out")
    assert_original_metadata(card((tmp_path / "out" / "README.md").read_text()))


@pytest.mark.parametrize(
    "readme",
    [
        b"---\nlicense: [unclosed\n---\n\nStill text.\n",  # YAML that does not parse
        b"---\n- a list\n---\n\nStill text.\n",  # YAML that is not a mapping
        # Keys ModelCardData would take for its methods, values of the wrong types.
        b"---\nto_dict: 1\nignore_metadata_errors: false\n_x: 1\ntags: 5\nlicense: {a: b}\n"
        b"model-index: 7\nbase_model: [1, 2]\npipeline_tag: [x]\ndatasets: 3\n---\n\nStill text.\n",
        b"\xff\xfe not UTF-8",
        b"x" * (256 * 1024 + 1),  # larger than any model card
    ],
)
def test_a_bad_card_never_stops_an_add_or_an_export(run, tmp_path, readme):
    src = sql_adapter(tmp_path / "src", card=None)
    (src / "README.md").write_bytes(readme)
    run("add", src, "-n", "sql:v1")
    run("export", "sql:v1", tmp_path / "out")
    c = card((tmp_path / "out" / "README.md").read_text())
    assert c.data.library_name == "peft" and c.data.base_model is None
    assert c.data.license is None and c.data.datasets is None  # never of the wrong type
    assert c.data.pipeline_tag == "text-generation"
    if readme.startswith(b"---"):
        assert "Still text." in c.text


# ------------------------------------------------------------ symlinked and badly typed cards

CANARY = "aws_secret_access_key = CANARY-card-secret-0123456789"


def test_a_readme_linked_out_of_the_folder_is_not_kept(server, tmp_path):
    secret = tmp_path / "credentials"
    secret.write_text(f"---\nlicense: mit\n---\n\n{CANARY}\n")
    src = sql_adapter(tmp_path / "src", card=None)
    (src / "README.md").symlink_to(secret)
    run = cli_runner(tmp_path / "home")
    added = run("add", src, "-n", "sql:v1")  # the add succeeds, without the card
    assert "outside" in added.stderr and "not kept" in added.stderr
    assert CANARY not in run("show", "sql:v1", "--json").output
    run("export", "sql:v1", tmp_path / "out")
    folder = Path(run("path", "sql:v1", "-q").stdout.strip())
    run("push", "sql:v1", "myorg/sql")
    published = [
        *(p.read_bytes() for p in (tmp_path / "out").iterdir()),
        *(p.read_bytes() for p in folder.iterdir()),
        *server.repo_files("myorg/sql").values(),
    ]
    assert published and not [b for b in published if CANARY.encode() in b]
    assert not [
        p
        for p in (tmp_path / "home").rglob("*")
        if p.is_file() and CANARY.encode() in p.read_bytes()
    ], "the secret was stored"


def test_a_readme_linked_inside_the_folder_is_kept(run, tmp_path):
    src = sql_adapter(tmp_path / "src", card=None)
    (src / "docs").mkdir()
    (src / "docs" / "card.md").write_text(ORIGINAL)
    (src / "README.md").symlink_to(Path("docs") / "card.md")
    run("add", src, "-n", "sql:v1")
    run("export", "sql:v1", tmp_path / "out")
    assert_original_metadata(card((tmp_path / "out" / "README.md").read_text()))


def test_a_hf_cache_snapshot_card_linking_into_its_blobs_is_kept(run, tmp_path):
    # The layout huggingface_hub's cache has: snapshot files link into the repo's blobs/.
    repo = tmp_path / "hub" / "models--someone--peft-sql"
    snapshot = sql_adapter(repo / "snapshots" / ("a" * 40), card=None)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_text(ORIGINAL)
    (snapshot / "README.md").symlink_to(Path("..", "..", "blobs", "f00d"))
    run("add", snapshot, "-n", "sql:v1")
    run("export", "sql:v1", tmp_path / "out")
    assert_original_metadata(card((tmp_path / "out" / "README.md").read_text()))
    # Out of the cache repo's folder, refused all the same.
    (tmp_path / "hub" / "secret").write_text(CANARY)
    (snapshot / "README.md").unlink()
    (snapshot / "README.md").symlink_to(Path("..", "..", "..", "secret"))
    other = cli_runner(tmp_path / "home-b")
    other("add", snapshot, "-n", "sql:v1")
    other("export", "sql:v1", tmp_path / "out2")
    assert CANARY not in (tmp_path / "out2" / "README.md").read_text()


def test_a_pulled_card_linking_out_of_the_cache_repo_is_not_kept(server, tmp_path, monkeypatch):
    from lorahub import remote

    src = sql_adapter(tmp_path / "src", card=None, base_model_name_or_path="tiny/llama")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    server.seed_repo("someone/peft-sql", files | {"README.md": b"---\nlicense: mit\n---\nhi\n"})
    secret = tmp_path / "secret"
    secret.write_text(CANARY)
    download = remote.download_adapter

    def swapped(*args, **kwargs):  # the cached README replaced by a link out of the cache
        got = download(*args, **kwargs)
        assert got.card is not None
        got.card.unlink()
        got.card.symlink_to(secret)
        return got

    monkeypatch.setattr(remote, "download_adapter", swapped)
    run = cli_runner(tmp_path / "home")
    run("pull", "someone/peft-sql", "--name", "sql:v1")
    run("push", "sql:v1", "myorg/copy")
    assert CANARY.encode() not in server.repo_files("myorg/copy")["README.md"]


@pytest.mark.parametrize(
    "front",
    [
        "eval_results: 3",
        "license: [1, 2]",
        "tags: 5",
        "eval_results: 3\nlicense: [1, 2]\ntags: 5\nmodel_name: [x]",
        "model-index: [{name: [1], results: [{task: {type: [1]}, dataset: {name: d, type: d},"
        " metrics: [{type: m, value: 1}]}]}]",
    ],
)
def test_a_badly_typed_card_adds_exports_paths_and_pushes(server, tmp_path, front):
    src = sql_adapter(tmp_path / "src", card=f"---\n{front}\ndatasets: [a/b]\n---\n\nKept.\n")
    run = cli_runner(tmp_path / "home")
    run("add", src, "-n", "sql:v1")
    run("export", "sql:v1", tmp_path / "out")
    folder = Path(run("path", "sql:v1", "-q").stdout.strip())
    run("push", "sql:v1", "myorg/sql")
    for text in (
        (tmp_path / "out" / "README.md").read_text(),
        (folder / "README.md").read_text(),
        server.repo_files("myorg/sql")["README.md"].decode(),
    ):
        c = card(text)
        assert c.data.library_name == "peft" and c.data.datasets == ["a/b"]
        assert c.data.license is None and "Kept." in c.text
        assert "lora" in c.data.tags and c.data.get("eval_results") is None


def test_the_typed_fields_match_model_card_data():
    """Every typed field of the installed ModelCardData is checked at parse time."""
    import inspect

    from huggingface_hub import ModelCardData

    from lorahub import card as cards

    params = set(inspect.signature(ModelCardData.__init__).parameters) - {"kwargs"}
    checked = cards._STRING_FIELDS | cards._STRINGS_FIELDS | cards._RESERVED
    assert params <= checked, params - checked


VALID_MODEL_INDEX = (
    "model-index: [{name: sql, results: [{task: {type: text-generation}, dataset: {name: d,"
    " type: d}, metrics: [{type: accuracy, value: 0.5}]}]}]"
)


@pytest.mark.parametrize(
    "front",
    [
        None,  # no card of its own
        ORIGINAL,
        f"---\n{VALID_MODEL_INDEX}\nlicense: mit\n---\n\nText.\n",
        "---\nlicense: other\nlicense_name: x\ncustom: {deep: [1, 2.5, null, 'yes']}\n---\n",
        "---\npipeline_tag: summarization\ntags: [a, base_model:x, b]\n---\n",
        "---\neval_results: 3\nlicense: [1, 2]\ntags: 5\nmodel_name: [x]\n---\n",
        "---\nmodel-index: [{name: [1], results: [{task: {type: [1]}, dataset: {name: d,"
        " type: d}, metrics: [{type: m, value: 1}]}]}]\ndatasets: [a/b]\n---\n",
    ],
)
@pytest.mark.parametrize("base_model_id", [None, "org/base"])
def test_the_card_data_is_what_the_rendered_card_parses_to(tmp_path, front, base_model_id):
    """``adapter_card_data`` (serve's cardData, without rendering) equals the front matter
    of the card ``adapter_card`` renders, for cards of every shape the tests above use."""
    import lorahub
    from lorahub.card import adapter_card, adapter_card_data, split_card

    src = sql_adapter(tmp_path / "src", card=front)
    with lorahub.Hub(tmp_path / "home") as hub:
        info = hub.add(src, name="sql:v1").adapter
    rendered, _ = split_card(adapter_card(info, base_model_id=base_model_id))
    assert rendered["library_name"] == "peft"
    assert adapter_card_data(info, base_model_id=base_model_id) == rendered
