import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from linechatd.hashing import partition_for, stable_hash

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Pinned vectors, cross-checked with `printf %s UID | sha256sum` (first 16 hex
# digits). Changing any of them moves users between partitions: a breaking,
# versioned change of the external contract.
VECTORS = [
    # uid, stable_hash, partition for P=64, P=7, P=4096
    ("alice", 0x2BD806C97F0E00AF, 47, 1, 175),
    ("bob", 0x81B637D8FCD2C6DA, 26, 1, 1754),
    ("", 0xE3B0C44298FC1C14, 20, 1, 3092),
    ("user:42@example.com", 0xFFA4F12ECD72037C, 60, 4, 892),
    ("a_b.c-d", 0x8F7E6F0CB341B258, 24, 5, 600),
    ("\u00e9", 0x4A99557E4033C353, 19, 3, 851),  # UTF-8 bytes c3 a9
]


@pytest.mark.parametrize(("uid", "expected", "p64", "p7", "p4096"), VECTORS)
def test_pinned_vectors(uid: str, expected: int, p64: int, p7: int, p4096: int) -> None:
    assert stable_hash(uid) == expected
    assert partition_for(uid, 64) == p64
    assert partition_for(uid, 7) == p7
    assert partition_for(uid, 4096) == p4096


def test_alice_decimal_value_matches_docs() -> None:
    assert stable_hash("alice") == 3159282601090220207


def test_hash_is_unsigned_64_bit() -> None:
    for i in range(2000):
        h = stable_hash(f"user-{i}")
        assert 0 <= h < 2**64
    # This vector has its top bit set, so a signed read would go negative.
    assert stable_hash("user:42@example.com") >= 2**63


@pytest.mark.parametrize("partitions", [1, 2, 3, 7, 64, 1000, 4096])
def test_partition_in_range(partitions: int) -> None:
    seen = {partition_for(f"u{i}", partitions) for i in range(3000)}
    assert seen <= set(range(partitions))
    if partitions <= 64:
        # 3000 uids spread over every one of a few partitions.
        assert seen == set(range(partitions))


def test_single_partition_is_always_zero() -> None:
    assert {partition_for(f"u{i}", 1) for i in range(100)} == {0}


@pytest.mark.parametrize("partitions", [0, -1])
def test_partition_count_must_be_positive(partitions: int) -> None:
    with pytest.raises(ValueError, match="partitions must be >= 1"):
        partition_for("alice", partitions)


def test_same_partitions_under_different_hash_seeds() -> None:
    uids = [uid for uid, *_ in VECTORS] + [f"user-{i}" for i in range(50)]
    code = (
        "import json, sys\n"
        "from linechatd.hashing import partition_for\n"
        "uids = json.loads(sys.stdin.read())\n"
        "print(json.dumps([partition_for(u, 64) for u in uids]))\n"
    )
    expected = [partition_for(u, 64) for u in uids]
    for seed in ("0", "1", "4242", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(uids),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        assert json.loads(result.stdout) == expected, f"PYTHONHASHSEED={seed}"
