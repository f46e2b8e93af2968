"""The training benchmark at toy size, so it cannot rot; its figures are checked for consistency."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_train


def test_bench_train_runs_and_matches_the_reference_trajectory(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BENCH_SMALL", "1")
    monkeypatch.setenv("BENCH_STEPS", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench_train.run(bench_train.SMALL, torch.device("cpu"))
        bench_train.main()
    finally:
        torch.set_num_threads(threads)
    assert [r["architecture"] for r in rows] == list(bench_train.ARCHITECTURES)
    for row in rows:
        assert row["ours_vps"] > 0 and row["reference_vps"] > 0 and row["sparsify_topk_vps"] > 0
        assert row["vs_reference"] == pytest.approx(row["ours_vps"] / row["reference_vps"])
        assert row["vs_sparsify"] == pytest.approx(row["ours_vps"] / row["sparsify_topk_vps"])
        # Same initial weights, same batches, same maths: the sparse path trains exactly like the dense one.
        assert row["fvu_ours"] == pytest.approx(row["fvu_reference"], rel=1e-3)
    # sparsify's TopK runs the same maths as our TopK (its loss is ours over a constant, which Adam ignores).
    assert rows[0]["fvu_sparsify_topk"] == pytest.approx(rows[0]["fvu_ours"], rel=1e-2)
    assert not any(math.isnan(r["fvu_sparsify_topk"]) for r in rows)
    table = capsys.readouterr().out
    assert "| architecture |" in table and "| matryoshka_batchtopk |" in table
