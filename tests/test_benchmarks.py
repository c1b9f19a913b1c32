"""The train-throughput benchmark pairs its ratios by round and block (its summary arithmetic)."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(variant, round_, block_ips, round_trips, **extra):
    return dict(
        model="paper_cnn",
        variant=variant,
        round=round_,
        block_images_per_second=block_ips,
        core_round_trip_ns=round_trips,
        images_per_second=sorted(block_ips)[len(block_ips) // 2],
        peak_rss_mb=100.0 if variant == "medjax" else 200.0,
        compile_s=1.0,
        num_params=10,
        **extra,
    )


def test_train_throughput_pairs_ratios_by_round_and_block():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import train_throughput

    near, far = train_throughput.NEAR_ROUND_TRIP_NS / 2, train_throughput.NEAR_ROUND_TRIP_NS * 2
    results = [
        _record("medjax", 0, [300.0, 200.0], [near, far]),
        _record("torch", 0, [100.0, 200.0], [near, far]),
        _record("medjax", 1, [150.0, 400.0, 120.0], [far, near, far]),
        _record("torch", 1, [100.0, 100.0, 100.0], [far, near, far]),
        # A round whose reference failed pairs with nothing.
        _record("medjax", 2, [900.0], [near]),
        dict(model="paper_cnn", variant="torch", round=2, error="worker exited"),
    ]
    summary = train_throughput.summarize(results)
    # Block ratios: round 0 -> 3.0 (near), 1.0 (far); round 1 -> 1.5 (far), 4.0 (near), 1.2 (far).
    assert summary["ratio_vs_torch_paired"]["paper_cnn"]["medjax"] == 1.5
    by_cores = summary["ratio_vs_torch_paired_by_cores"]
    assert by_cores["near"]["paper_cnn"]["medjax"] == {"ratio": 3.5, "blocks": 2}
    assert by_cores["far"]["paper_cnn"]["medjax"] == {"ratio": 1.2, "blocks": 3}
    assert summary["errors"] == 1
    assert summary["core_round_trip_ns"]["far_share"] == 3 / 6
    assert summary["ratio_vs_torch"]["paper_cnn"]["medjax_peak_rss"] == 0.5
