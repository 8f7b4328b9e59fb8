"""The tail-speed tool measures every setting and writes nothing."""

from __future__ import annotations

import birds_lpft.tools.tail_speed as tail_speed


def test_tail_speed_reports_every_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    means = tail_speed.main(["--steps", "1", "--rounds", "1", "--image-size", "32", "--split", "14"])
    assert sorted(means) == ["avg bf16", "avg bf16 every conv", "avg fp32", "gem bf16", "gem bf16 every conv",
                            "gem fp32"]
    assert all(v > 0 for v in means.values())
    assert "mean views/s" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_tail_speed_measures_the_chosen_settings_with_and_without_kept_memory(capsys):
    means = tail_speed.main(["--steps", "1", "--rounds", "1", "--image-size", "32", "--split", "14", "--pool", "gem",
                             "--precision", "bf16", "--memory", "glibc", "kept"])
    assert sorted(means) == ["gem bf16, memory glibc", "gem bf16, memory kept"]
    assert "round 1 gem bf16, memory kept" in capsys.readouterr().out
