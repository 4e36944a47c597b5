"""The host's grid arithmetic (kernels/ftw_kernels/grids.py) gives what Triton's constexpr functions give, for
every size a launch may take, so swapping them changes no grid and no block."""

import torch
import triton

from ftw_kernels.grids import cdiv, next_power_of_2, rank_block, sm_count


def test_cdiv_is_tritons():
    for n in range(0, 20_000, 7):
        for by in (1, 3, 8, 16, 64, 128, 256, 1024):
            assert cdiv(n, by) == triton.cdiv(n, by), (n, by)


def test_next_power_of_2_is_tritons():
    sizes = [*range(0, 5_000), 14_336, 65_535, 65_536, 65_537, 128_256, 2**31 - 1, 2**31]
    for n in sizes:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_rank_block_is_a_power_of_two_of_at_least_16_covering_the_rank():
    assert [rank_block(r) for r in (1, 8, 16, 17, 32, 33, 64)] == [16, 16, 16, 32, 32, 64, 64]


def test_sm_count_is_the_devices_and_one_off_cuda():
    assert sm_count(torch.device("cpu")) == 1
    if torch.cuda.is_available():
        want = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        assert sm_count(torch.device("cuda")) == sm_count(torch.device("cuda", torch.cuda.current_device())) == want
