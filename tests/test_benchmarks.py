"""benchmarks/results.md: each script rewrites its own section and keeps everyone else's."""

import sys

from conftest import REPO


def test_a_methods_run_replaces_its_quantizers_table_only_and_run_all_keeps_every_section_it_does_not_write(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_methods
    import run_all

    nf4, hqq3 = bench_methods.section_title("nf4"), bench_methods.section_title("hqq3")
    notes = "# methods, beyond the tables: by hand\n\nkept\n"
    results = tmp_path / "results.md"
    results.write_text(f"# Benchmarks\n\nhead\n\n# loss: x\n\nloss table\n\n{nf4}\n\nold nf4 table\n\n{notes}"
                       "# peers: by hand\n\npeers table\n")
    bench_methods.write_section(results, hqq3, f"{hqq3}\n\nhqq3 table\n")
    bench_methods.write_section(results, nf4, f"{nf4}\n\nnew nf4 table\n")
    text = results.read_text()
    assert "old nf4 table" not in text and text.count(nf4) == text.count(hqq3) == 1
    assert text.index("loss table") < text.index("new nf4 table") < text.index("kept") < text.index("hqq3 table")
    kept = "".join(run_all.kept_sections(text, ["loss", "eval"]))  # what `make bench` leaves as it is
    assert "loss table" not in kept and "head" not in kept
    assert all(part in kept for part in ("new nf4 table", "kept", "hqq3 table", "peers table"))


def test_unseen_text_windows_are_spread_over_the_whole_text_without_overlap(smol_tokenizer):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_unseen_text

    for make, _ in bench_unseen_text.TEXTS.values():
        text = make()
        ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
        rows = bench_unseen_text.windows(smol_tokenizer, text, chunks=8, tokens=64).tolist()
        step = (len(ids) - 64) // 7
        assert step >= 64  # no two windows share a token
        # SmolLM2's tokenizer adds no BOS: each window is the text's own 64 tokens, the last near its end.
        assert rows == [ids[i * step : i * step + 64] for i in range(8)]
        assert len(ids) - (7 * step + 64) < 7
