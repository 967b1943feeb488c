"""The ``study`` subcommand: flags map onto StudyConfig, bad flags are one-line errors with exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparseinfer.cli import main
from sparseinfer.sparsity import study_command
from sparseinfer.sparsity.study import PAPER_CETT_TARGETS, StudyConfig


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[StudyConfig]:
    """Replace the study run by a recorder: these tests check the CLI layer, not the study."""
    configs: list[StudyConfig] = []

    def fake_run(config: StudyConfig):
        configs.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(study_command, "run_study_config", fake_run)
    return configs


def test_flags_map_onto_the_config(
    captured, sparse_checkpoint: Path, calibration_text: Path, tmp_path
) -> None:
    argv = ["study", str(sparse_checkpoint), "--text", str(calibration_text), "--cett", "0.01, 0.2,0.5"]
    argv += ["--tokens", "2048", "--seq-len", "64", "--out", str(tmp_path / "o"), "--heldout", "0.3"]
    argv += [
        "--rank",
        "4",
        "--recall",
        "0.95",
        "--default-cett",
        "0.1",
        "--no-progress",
        "--dtype",
        "bfloat16",
    ]
    with pytest.raises(SystemExit):
        main(argv)
    (cfg,) = captured
    assert cfg.cett_targets == (0.01, 0.2, 0.5) and cfg.default_cett == 0.1
    assert (cfg.tokens, cfg.seq_len, cfg.heldout_fraction) == (2048, 64, 0.3)
    assert (cfg.predictor_rank, cfg.recall_target, cfg.progress) == (4, 0.95, False)
    assert cfg.out_dir == tmp_path / "o" and cfg.model_path == sparse_checkpoint
    assert str(cfg.dtype) == "torch.bfloat16"


def test_defaults_are_the_papers_sweep(captured, sparse_checkpoint: Path, calibration_text: Path) -> None:
    with pytest.raises(SystemExit):
        main(["study", str(sparse_checkpoint), "--text", str(calibration_text)])
    (cfg,) = captured
    assert cfg.cett_targets == PAPER_CETT_TARGETS and cfg.default_cett == 0.2
    assert cfg.out_dir == Path(f"study-{sparse_checkpoint.name}")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cett", "0.1,1.2"], "--cett '0.1,1.2': 1.2 is outside (0, 1)"),
        (["--cett", "0.1,x"], "'x' is not a number"),
        (["--cett", "0.1,"], "empty entry"),
        (["--default-cett", "0"], "--default-cett: CETT target must be in (0, 1)"),
        (["--heldout", "1"], "heldout_fraction must be in (0, 1)"),
        (["--tokens", "0"], "--tokens must be ≥ 1"),
    ],
)
def test_bad_flags_are_one_line_errors(
    captured, sparse_checkpoint, calibration_text, capsys, flags, message
) -> None:
    status = main(["study", str(sparse_checkpoint), "--text", str(calibration_text), *flags])
    err = capsys.readouterr().err
    assert status == 2 and not captured
    assert err.startswith("sparseinfer study: error: ") and message in err and err.count("\n") == 1


def test_missing_model_and_short_text_are_clear_errors(
    sparse_checkpoint, short_text, tmp_path, capsys
) -> None:
    assert main(["study", str(tmp_path / "nope"), "--text", str(short_text)]) == 2
    assert "not a directory" in capsys.readouterr().err
    status = main(["study", str(sparse_checkpoint), "--text", str(short_text), "--out", str(tmp_path / "o")])
    assert status == 2
    assert "too short" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a failed run
