"""The shard writer: direct and buffered writes give the same bytes; checksums come from memory."""

import random

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from merge.io.manifest import shard_checksums
from merge.io.writer import ALIGN, PlannedTensor, ShardWriter, layout_shards

TENSORS = {
    "a.mask": torch.tensor([True, False, True, True, False]),  # 5 bytes: everything after is misaligned
    "b.weight": torch.randn(3001).to(torch.bfloat16),
    "c.weight": torch.randn(40_000).to(torch.bfloat16),
    "d.bias": torch.randn(4099),
    "e.codes": torch.randint(-100, 100, (7,), dtype=torch.int8),
    "f.weight": torch.randn(70_001).to(torch.bfloat16),
}


def _placed(writer: ShardWriter, name: str, start: int, values: torch.Tensor) -> torch.Tensor:
    """``values`` copied into a buffer whose address matches the file position modulo ALIGN, as the
    executor places its output buffers."""
    n = values.numel() * values.element_size()
    raw = torch.empty(n + 2 * ALIGN, dtype=torch.uint8)
    first = (-raw.data_ptr()) % ALIGN + writer.skew(name, start)
    if first % values.element_size():
        first = 0
    return raw[first:first + n].view(values.dtype).copy_(values)


def _write_all(folder, direct: bool, placed: bool, seed: int):
    shards = layout_shards([PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in TENSORS.items()], 200_000)
    writer = ShardWriter(folder, shards, direct=direct)
    rng = random.Random(seed)
    pieces = []
    for name, value in TENSORS.items():
        start = 0
        while start < value.numel():
            stop = min(value.numel(), start + rng.choice([1, 100, 2048, 5000, 33_333]))
            pieces.append((name, start, value[start:stop]))
            start = stop
    # tensors interleaved, as several workers write them, each tensor's pieces in order
    queues = {name: [p for p in pieces if p[0] == name] for name in TENSORS}
    while any(queues.values()):
        name = rng.choice([n for n, q in queues.items() if q])
        _, start, values = queues[name].pop(0)
        writer.write(name, start, _placed(writer, name, start, values) if placed else values.clone())
    writer.sync()
    writer.close()
    return writer, shards


def test_direct_and_buffered_writes_give_identical_files(tmp_path):
    (tmp_path / "buffered").mkdir()
    (tmp_path / "direct").mkdir()
    plain, shards = _write_all(tmp_path / "buffered", direct=False, placed=False, seed=1)
    direct, _ = _write_all(tmp_path / "direct", direct=True, placed=True, seed=2)
    assert plain.direct_bytes == 0
    for shard in shards:
        direct_file, buffered_file = tmp_path / "direct" / shard.filename, tmp_path / "buffered" / shard.filename
        assert direct_file.read_bytes() == buffered_file.read_bytes()
        loaded = load_file(tmp_path / "direct" / shard.filename)
        for t in shard.tensors:
            assert torch.equal(loaded[t.name], TENSORS[t.name]), t.name
    if direct.direct_bytes == 0:
        pytest.skip("this file system refuses O_DIRECT: only the buffered path ran")
    assert direct.direct_bytes > 100_000


def test_checksums_come_from_memory_and_match_the_file(tmp_path):
    writer, shards = _write_all(tmp_path, direct=True, placed=False, seed=3)
    for shard in shards:
        from_file = shard_checksums(tmp_path / shard.filename, shard)["xxh3"]
        assert [writer.tensor_checksum(t.name) for t in shard.tensors] == from_file
        assert from_file == [xxhash.xxh3_64_hexdigest(TENSORS[t.name].contiguous().view(torch.uint8).numpy())
                             for t in shard.tensors]


def test_a_tensor_written_out_of_order_has_no_checksum_from_memory(tmp_path):
    shards = layout_shards([PlannedTensor("w", torch.float32, (10,))], 1 << 20)
    writer = ShardWriter(tmp_path, shards)
    x = torch.arange(10, dtype=torch.float32)
    writer.write("w", 5, x[5:])
    writer.write("w", 0, x[:5])
    writer.close()
    assert writer.tensor_checksum("w") is None
    assert load_file(tmp_path / shards[0].filename)["w"].equal(x)
