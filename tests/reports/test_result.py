from __future__ import annotations

from collections.abc import Iterator

import pytest

from relayprobe.reports import result
from relayprobe.reports.result import new_result_id


def test_a_result_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """`relayprobe history --show -xyz...` would read the ID as an option: one in 64 would."""
    drawn: Iterator[str] = iter(["-leading-dash-is-an-opt", "_AbCdEfGhIjKlMnOpQrStUw"])
    monkeypatch.setattr(result.secrets, "token_urlsafe", lambda nbytes: next(drawn))
    assert new_result_id() == "_AbCdEfGhIjKlMnOpQrStUw"


def test_a_result_id_is_22_url_safe_characters() -> None:
    ids = {new_result_id() for _ in range(256)}
    assert len(ids) == 256
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert all(
        set(i) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        for i in ids
    )
