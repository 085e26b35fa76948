"""Protocol plumbing: id lists, bitmaps and the error <-> status round trip."""

from __future__ import annotations

import grpc
import pytest

from core import errors
from core.wire import error_from_rpc, make_bitmap, pack_ids, read_bitmap, status_for, unpack_ids


def test_id_lists() -> None:
    ids = [bytes([i]) * 32 for i in range(5)]
    assert unpack_ids(pack_ids(ids)) == ids
    with pytest.raises(errors.UsageError, match="multiple of 32"):
        unpack_ids(b"x" * 33)
    with pytest.raises(errors.UsageError, match="limit"):
        unpack_ids(b"x" * 32 * 3, limit=2)


def test_bitmap_round_trip() -> None:
    flags = [i % 3 == 0 for i in range(37)]
    assert read_bitmap(make_bitmap(flags), 37) == flags
    with pytest.raises(errors.TransportError):
        read_bitmap(b"", 3)


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._c, self._d = code, details

    def code(self) -> grpc.StatusCode:
        return self._c

    def details(self) -> str:
        return self._d


@pytest.mark.parametrize(
    "exc",
    [
        errors.NotFound("no snapshot"),
        errors.ResourceExhausted("disk full"),
        errors.KeyMaterialError("wrong key"),
        errors.RepositoryMissing("no repo"),
        errors.IntegrityError("bad"),
        errors.PermissionDenied("revoked"),
    ],
)
def test_errors_survive_the_wire(exc: errors.ClawbackError) -> None:
    code, detail = status_for(exc)
    back = error_from_rpc(_Rpc(code, detail))
    assert type(back) is type(exc) and str(exc) in str(back)
    assert back.exit_code == exc.exit_code


def test_plain_unavailable_names_the_coordinator() -> None:
    e = error_from_rpc(_Rpc(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    assert isinstance(e, errors.Unavailable) and "unreachable" in str(e)
