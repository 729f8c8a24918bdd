"""The schema comes from Alembic revisions, and they match the ORM exactly."""

from __future__ import annotations

import os
import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

import lorahub
from lorahub.catalog import db
from lorahub.catalog.models import Base


@pytest.mark.fresh_catalog
def test_upgrade_on_empty_database_gives_the_orm_schema(tmp_path, catalog):
    url = os.environ.get("LORAHUB_DATABASE_URL") or f"sqlite:///{tmp_path / 'x.db'}"
    engine = db.make_engine(url)
    assert db.current_revision(engine) is None  # empty: every revision runs
    db.upgrade(engine, None)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [] and db.current_revision(engine) == db.SCHEMA_HEAD
    engine.dispose()


def test_schema_head_constant_matches_the_scripts():
    cfg = Config()
    cfg.set_main_option("script_location", str(db.migrations_dir()))
    assert ScriptDirectory.from_config(cfg).get_current_head() == db.SCHEMA_HEAD


def test_store_opens_in_wal_mode_and_migrates_once(store_home):
    hub = lorahub.open(store_home)
    hub.list_adapters()
    hub.close()
    con = sqlite3.connect(store_home / "lorahub.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(db.SCHEMA_HEAD,)]
    con.close()
    # A second open finds the schema current and does not touch it.
    engine = create_engine(f"sqlite:///{store_home / 'lorahub.db'}")
    assert db.current_revision(engine) == db.SCHEMA_HEAD
