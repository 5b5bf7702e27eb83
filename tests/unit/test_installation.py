"""The installation label is unique per state dir (issue 17, item 5): generated at the first
start and kept in the database's flags; a database that already had instances keeps "main";
a label set in the config wins; a reload of a file without one keeps the label in force;
reap reads the kept label without the daemon."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from jobs_fakes import add_instance
from tests.conftest import MakeApp

from gpuwarden.config.settings import Settings
from gpuwarden.core.model import INSTALLATION_FLAG
from gpuwarden.fleet import installation


def conf(tmp_path: Path, **daemon: str) -> Settings:
    return Settings(daemon={"state_dir": str(tmp_path), **daemon})


async def test_a_new_state_dir_gets_its_own_label_and_keeps_it(
    tmp_path: Path, make_app: MakeApp
) -> None:
    (tmp_path / "one").mkdir()
    one = await make_app(conf(tmp_path / "one"))
    (tmp_path / "two").mkdir()
    two = await make_app(conf(tmp_path / "two"))
    first = await installation.resolve(one.store, one.settings)
    assert re.fullmatch(r"[0-9a-f]{8}", first)
    assert await installation.resolve(one.store, one.settings) == first  # kept
    assert await one.store.get_flag(INSTALLATION_FLAG) == first
    assert await installation.resolve(two.store, two.settings) != first
    assert installation.stored(one.settings.db_path) == first


async def test_a_database_with_instances_keeps_main(tmp_path: Path, make_app: MakeApp) -> None:
    app = await make_app(conf(tmp_path))
    await add_instance(app)  # launched as gpuwarden-main-i1 before labels were per state dir
    assert await installation.resolve(app.store, app.settings) == "main"
    assert await app.store.get_flag(INSTALLATION_FLAG) == "main"


async def test_a_label_set_in_the_config_wins_and_is_not_stored(
    tmp_path: Path, make_app: MakeApp
) -> None:
    app = await make_app(conf(tmp_path, installation="lab-2"))
    assert await installation.resolve(app.store, app.settings) == "lab-2"
    assert await app.store.get_flag(INSTALLATION_FLAG) is None
    # Even "main" written out counts as on purpose.
    assert installation.set_on_purpose(conf(tmp_path, installation="main"))
    assert not installation.set_on_purpose(conf(tmp_path))


def test_pinning_keeps_the_label_in_force_across_a_reload(tmp_path: Path) -> None:
    pinned = installation.pinned(conf(tmp_path), "abcd1234")
    assert pinned.daemon.installation == "abcd1234"
    assert pinned.daemon.state_dir == tmp_path  # the rest untouched
    reread = installation.pinned(conf(tmp_path), pinned.daemon.installation)
    assert reread.model_dump() == pinned.model_dump()
    # A config that names one keeps its own.
    assert (
        installation.pinned(conf(tmp_path, installation="x1"), "abcd1234").daemon.installation
        == "x1"
    )


def test_reap_finds_no_label_without_a_database(tmp_path: Path) -> None:
    assert installation.stored(tmp_path / "none.db") is None
    old = tmp_path / "old.db"  # from before labels were kept: its instances carry "main"
    sqlite3.connect(old).close()
    assert installation.stored(old) is None


@pytest.mark.parametrize(
    "content",
    [b"not a database" * 100, b"SQLite format 3\x00" + bytes(range(256)) * 8],
    ids=["not a database", "damaged"],
)
def test_an_unreadable_database_is_no_label_not_a_guess(tmp_path: Path, content: bytes) -> None:
    """Before, an unreadable database gave None and reap looked for "main": the instances
    of this installation, still billing, went unfound."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(content)
    with pytest.raises(installation.LabelUnreadable, match=r"junk\.db"):
        installation.stored(junk)
