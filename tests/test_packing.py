import pytest
import torch

from quantkit.formats.packing import pack_codes, packed_rows, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100, 576])
def test_round_trip(bits, k):
    codes = torch.randint(0, 2**bits, (5, k), generator=torch.Generator().manual_seed(bits * 1000 + k))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(k, bits), 5)
    assert torch.equal(unpack_codes(packed, bits, k).long(), codes)


def test_layout_4bit_is_nibbles_lowest_first():
    codes = (torch.arange(32) % 16).view(1, 32)
    p = pack_codes(codes, 4)
    assert p[0, 0].item() & 0xFFFFFFFF == 0x76543210
    assert p[1, 0].item() & 0xFFFFFFFF == 0xFEDCBA98


def test_layout_3bit_straddles_words():
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 10] = 0b111  # stream bits 30..32: two bits in word 0, one in word 1
    p = pack_codes(codes, 3)
    assert p[0, 0].item() & 0xFFFFFFFF == 0b11 << 30
    assert p[1, 0].item() == 1


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[4]]), 2)


def test_pack_codes_in_row_blocks_matches_one_block(monkeypatch):
    """Large weights are packed in row blocks (bounded int64 temporaries): same words as packing at once."""
    import quantkit.formats.packing as packing

    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 6):
        codes = torch.randint(0, 1 << bits, (37, 200), generator=g)
        whole = packing.pack_codes(codes, bits)
        monkeypatch.setattr(packing, "_BLOCK_CODES", 3 * 224)  # 3 rows per block, K padded to 224
        assert torch.equal(packing.pack_codes(codes, bits), whole)
        monkeypatch.undo()
