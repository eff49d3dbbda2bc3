import numpy as np
import pytest

from windquant_gym.quant.accounting import effective_bits, n_protected, storage_bits, unit_bit_tables


def test_protected_count_is_floor_of_rate_times_weights():
    assert n_protected(32, 0.1) == 3
    assert n_protected(147456, 0.03) == 4423
    assert n_protected(100, 0.03) == 3  # 3.0000000000000004 in floating point must not become 4
    assert n_protected(100, 0.0) == 0


def test_effective_bits_hand_computed():
    # 4 x 8 unit, 10% protection: n = 32, n_p = 3, n_q = 29.
    assert effective_bits(32, 3, 0) == 16 * 32
    assert effective_bits(32, 3, 1) == 8 * 32
    assert effective_bits(32, 3, 4) == 2 * 29 + 8 * 3
    assert effective_bits(32, 3, 5) == pytest.approx(1.58 * 29 + 8 * 3)
    assert effective_bits(32, 3, 6) == 1 * 29 + 8 * 3
    assert effective_bits(32, 0, 3) == 3 * 32


def test_storage_bits_hand_computed():
    # 2-bit codes 2*29, row scales 16*4, outliers (8 value + 3 column bits)*3, their per-row
    # scales 16*4, per-row counts ceil(log2(9)) = 4 bits * 4 rows.
    assert storage_bits(4, 8, 3, 4) == 58 + 64 + 33 + 64 + 16
    # Ternary is stored at 1.6 bits (5 trits per byte).
    assert storage_bits(4, 8, 3, 5) == pytest.approx(1.6 * 29 + 64 + 33 + 64 + 16)
    # No protection: codes and row scales only.
    assert storage_bits(4, 8, 0, 6) == 32 + 64
    assert storage_bits(4, 8, 3, 0) == 16 * 32
    # A ragged chunk of width 2: one column bit, 2 count bits per row.
    assert storage_bits(3, 2, 1, 2) == 4 * 5 + 16 * 3 + (8 + 1) * 1 + 16 * 3 + 2 * 3


def test_unit_tables_cover_ragged_chunks():
    n_weights, n_salient, effective, storage = unit_bit_tables([4, 4, 4], [8, 8, 2], 0.1)
    assert n_weights.tolist() == [32, 32, 8]
    assert n_salient.tolist() == [3, 3, 0]
    assert effective[2, 4] == 2 * 8
    assert storage[2, 4] == 2 * 8 + 16 * 4
    assert np.all(storage[:, 1:] >= effective[:, 1:] - 1e-9)  # storage never undercounts
    assert np.all(effective[:, 0] == 16 * n_weights)
