"""silenced: the named loggers and their children drop records inside the block and get their level back after."""

from __future__ import annotations

import logging

from graphquant.logs import silenced


def test_records_of_the_named_logger_and_its_children_are_dropped_inside_only(caplog):
    parent, child, other = (logging.getLogger(name) for name in ("gq_test", "gq_test.child", "gq_other"))
    parent.setLevel(logging.INFO)
    with silenced("gq_test"):
        parent.warning("parent inside")
        child.error("child inside")
        other.warning("other inside")
    child.warning("child after")
    assert [record.getMessage() for record in caplog.records] == ["other inside", "child after"]
    assert parent.level == logging.INFO
