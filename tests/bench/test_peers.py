"""bench.peers: restic and Borg as benchmark tools: secrets stay out of argv, restores verify identical."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import peers, run
from bench.peers import BorgTool, ResticTool


class Recorder:
    """Replaces a peer's `_run`: records every command and its environment, runs nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, str], Path | None]] = []

    def __call__(self, tool: peers._CliTool) -> Callable[..., str]:
        def fake_run(argv: list[str], cwd: Path | None = None) -> str:
            self.calls.append((list(argv), dict(tool.env), cwd))
            if argv[1] == "backup":
                return json.dumps({"message_type": "summary", "snapshot_id": "abc123"}) + "\n"
            return ""

        return fake_run


def _secret(workdir: Path) -> str:
    return (workdir / "password").read_text().strip()


@pytest.mark.parametrize("cls", [ResticTool, BorgTool])
def test_no_secret_on_any_command_line(
    cls: type[peers._CliTool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Secrets a user might have exported must not leak into (or redirect) the peer either.
    monkeypatch.setenv("RESTIC_PASSWORD", "inherited-secret")
    monkeypatch.setenv("BORG_PASSPHRASE", "inherited-secret")
    monkeypatch.setenv("RESTIC_REPOSITORY", "/somewhere/else")
    tool = cls()
    rec = Recorder()
    monkeypatch.setattr(tool, "_run", rec(tool))
    source = tmp_path / "data"
    source.mkdir()
    work = tmp_path / "work"
    tool.start(work, source)
    sid = tool.backup()
    tool.backup()
    tool.restore(sid, tmp_path / "restore")

    secret = _secret(work)
    assert len(secret) >= 32
    assert stat.S_IMODE((work / "password").stat().st_mode) == 0o600
    assert [c[0][1] for c in rec.calls] == (
        ["init", "backup", "backup", "restore"]
        if cls is ResticTool
        else ["init", "create", "create", "extract"]
    )
    for argv, env, _ in rec.calls:
        line = " ".join(argv)
        assert secret not in line and "inherited-secret" not in line
        assert not any(a.startswith(("--password", "--passphrase")) for a in argv), argv
        assert "RESTIC_PASSWORD" not in env and "BORG_PASSPHRASE" not in env
        assert "inherited-secret" not in env.values()
        # The secret reaches the tool only as a path to the 0600 file.
        assert secret not in "".join(env.values())
        if cls is ResticTool:
            assert env["RESTIC_PASSWORD_FILE"] == str(work / "password")
            assert env["RESTIC_REPOSITORY"] == str(work / "repo")
        else:
            assert env["BORG_PASSCOMMAND"] == f"cat {work / 'password'}"
            assert env["BORG_BASE_DIR"].startswith(str(work))
    backups = [argv for argv, _, _ in rec.calls if argv[1] in ("backup", "create")]
    # The same absolute source path every time (restic's parent snapshot is found by path).
    assert backups[0][-1] == backups[1][-1] == str(source.resolve())
    if cls is ResticTool:
        assert rec.calls[0][0][2:] == ["--repository-version", "2"]
        assert backups[0][3:5] == ["--compression", "auto"]
    else:
        assert rec.calls[0][0][2:4] == ["--encryption", "repokey-blake2"]
        assert backups[0][2:4] == ["--compression", "zstd,3"]
        assert rec.calls[-1][2] == tmp_path / "restore"  # extract runs inside the target
    assert tool.restored_path(tmp_path / "r") == tmp_path / "r" / str(source.resolve())[1:]


def test_password_file_is_never_world_readable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        peers._write_secret(tmp_path / "pw")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "pw").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):  # never reuses (or follows) an existing file
        peers._write_secret(tmp_path / "pw")


def test_missing_peer_is_reported_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "peer_versions", lambda: {"restic": None, "borg": "borg 1.4.5"})
    problems = peers.ensure_peers(["restic", "borg"], install=False)
    assert list(problems) == ["restic"] and "make bench-deps" in problems["restic"]


def test_runner_refuses_to_run_without_its_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        peers, "ensure_peers", lambda tools, install=True: {"borg": "borg: cannot install: x"}
    )
    rc = run.main(["--size", "1M", "--workdir", str(tmp_path / "w"), "--tools", "borg"])
    err = capsys.readouterr().err
    assert rc != 0 and "make bench-deps" in err and "--tools clawback" in err
    assert not (tmp_path / "w").exists()


def _e2e(tool: run.Tool, tmp_path: Path) -> None:
    res, manifest = run.run_tool(tool, tmp_path, "5M", seed=1, log=lambda _: None)
    assert res.error is None, res.error
    assert res.verified is True, res.differences
    assert [s.step for s in res.steps] == list(run.STEPS)
    full, unchanged, mutated, _ = res.steps
    assert full.source_bytes == manifest.total_bytes
    assert 0 < full.repo_bytes <= unchanged.repo_bytes < mutated.repo_bytes  # type: ignore[operator]
    for s in res.steps:
        assert s.cpu_s["cli"] > 0, s
    # Peaks are sampled (every 0.2 s): a very short command may be missed, a whole step is not.
    assert any(s.peak_rss_bytes.get("cli", 0) > 1 << 20 for s in res.steps), res.steps
    # The restore really is where the comparison looked: the source's absolute path under the target.
    restored = run.restored_root(tool, tmp_path / tool.name / "restore")
    assert restored != tmp_path / tool.name / "restore" and restored.is_dir()


@pytest.mark.timeout(30, func_only=True)  # the fixture may first install the peer (minutes)
def test_restic_end_to_end(tmp_path: Path, require_peer: Callable[[str], None]) -> None:
    require_peer("restic")
    _e2e(ResticTool(), tmp_path)


@pytest.mark.timeout(30, func_only=True)
def test_borg_end_to_end(tmp_path: Path, require_peer: Callable[[str], None]) -> None:
    require_peer("borg")
    _e2e(BorgTool(), tmp_path)


@pytest.mark.timeout(30, func_only=True)
def test_a_real_run_keeps_the_secret_out_of_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, require_peer: Callable[[str], None]
) -> None:
    """The same check against the commands actually spawned, for both peers."""
    require_peer("restic")
    require_peer("borg")
    spawned: list[list[str]] = []
    real_run = subprocess.run

    def spy(argv: list[str], *a: object, **kw: object) -> subprocess.CompletedProcess[str]:
        spawned.append([str(x) for x in argv])
        return real_run(argv, *a, **kw)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(peers.subprocess, "run", spy)
    source = tmp_path / "data"
    source.mkdir()
    (source / "f").write_bytes(b"x" * 1000)
    secrets = []
    for cls in (ResticTool, BorgTool):
        tool = cls()
        work = tmp_path / cls.name
        tool.start(work, source)
        tool.restore(tool.backup(), tmp_path / f"{cls.name}-restore")
        secrets.append(_secret(work))
    assert len(spawned) == 6
    for argv in spawned:
        for s in secrets:
            assert s not in " ".join(argv)
